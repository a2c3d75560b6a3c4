"""The process-wide HTTP clients for upstream calls, and the endpoints they connect with.

Forwarded and composed calls use the project's strict client
(`deltagw.upstream.client`); the gateway's own JSON calls (token
verification) use treq on a Twisted pool of its own.
"""

from __future__ import annotations

from http.cookiejar import CookieJar
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from deltagw.upstream.client import ConnectionPool


class _NoCookies(CookieJar):
    """A jar that never stores: a shared jar would replay one user's upstream
    cookies to every other user. Client cookies still pass as plain headers."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


@implementer(IAgentEndpointFactory)
class _UpstreamEndpoints:
    """Endpoints for upstream URLs: plain TCP for IP literals, HostnameEndpoint
    for names, TLS on top for https (as ``twisted.web.client``'s standard
    factory does).

    ``HostnameEndpoint`` races address families with an ``attemptDelay``, so a
    refused connection to ``127.0.0.1`` takes about 300 ms to be reported;
    an IP literal has nothing to race, and a dead upstream must be found out
    at once for the breaker and the retry policy to be worth anything.
    """

    def __init__(self, reactor: Any, tls_policy: IPolicyForHTTPS) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port)
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


class UpstreamClient:
    """The process-wide HTTP clients for every upstream call.

    Forwarded and composed calls go through ``pool``, a lean HTTP/1.1 client
    (``deltagw.upstream.client``): twisted.web's Agent and treq were a large share of
    the gateway's CPU per proxied request (``make bench``), and treq's decoder
    would re-encode bodies a proxy must pass through byte for byte. treq
    (``http``) serves the gateway's own JSON calls (token verification), on
    a Twisted pool of its own. Neither pool retries by itself: retrying is a
    policy decision (idempotency, deadlines) the proxy makes.
    """

    def __init__(
        self,
        reactor: Any,
        max_idle_per_host: int,
        idle_timeout: float,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        endpoints = _UpstreamEndpoints(reactor, tls_policy or BrowserLikePolicyForHTTPS())
        self.pool = ConnectionPool(reactor, endpoints, max_idle_per_host, idle_timeout)
        self._json_pool = HTTPConnectionPool(reactor, persistent=True)
        self._json_pool.retryAutomatically = False
        self._json_pool.maxPersistentPerHost = max_idle_per_host
        self._json_pool.cachedConnectionTimeout = idle_timeout
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self._json_pool)
        self.http = HTTPClient(agent, cookiejar=_NoCookies())

    def close(self) -> defer.Deferred[None]:
        """Close the idle connections of both pools; fires when they are closed."""
        closing = [self.pool.close(), self._json_pool.closeCachedConnections()]
        return defer.gatherResults(closing).addCallback(lambda _: None)
