"""The service tree twistd runs: one listening site and the upstream pool.

Tree: ``GatewayService`` > (``RateLimits``, ``DrainService`` > listener).
Stopping drains first (stop listening, let in-flight requests finish), while
the limiter and the pool those requests use still work; then the rest.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from deltagw.app import Gateway
from deltagw.auth import CachingVerifier, LocalVerifier, RemoteVerifier, Verifier
from deltagw.authentication import Authenticator
from deltagw.config import ConfigError, Settings
from deltagw.drain import DrainService, RequestTracker
from deltagw.limits import RateLimits
from deltagw.logs import observer
from deltagw.metrics import Metrics
from deltagw.proxy import Proxy, UpstreamClient
from deltagw.retry import RetryPolicy
from deltagw.site import GatewaySite
from deltagw.systemd import SystemdNotifier


def make_verifier(settings: Settings, reactor: Any, http: HTTPClient) -> Verifier:
    """The token verifier the settings ask for, behind the verification cache.

    Local verification (JWT_SECRET or JWT_PUBLIC_KEY_FILE) trades central
    revocation for speed; otherwise the auth service is asked.

    Raises:
        ConfigError: the key for local verification is unusable.
    """
    inner: Verifier
    if settings.jwt_secret:
        inner = LocalVerifier.from_secret(settings.jwt_secret, reactor=reactor)
    elif settings.jwt_public_key_file:
        try:
            inner = LocalVerifier.from_public_key_file(
                settings.jwt_public_key_file, reactor=reactor
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"JWT_PUBLIC_KEY_FILE={settings.jwt_public_key_file!r}: {e}") from None
    else:
        inner = RemoteVerifier(http, settings.auth_url, settings.verify_timeout, reactor)
    return CachingVerifier(inner, reactor, ttl=settings.verify_cache_ttl)


class GatewayService(MultiService):
    """The whole gateway: whatever it opens on start it closes on stop.

    Args:
        settings: The validated configuration.
        reactor: The reactor to listen and time on.
    """

    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.client = UpstreamClient(
            reactor, settings.max_idle_per_host, settings.idle_upstream_timeout
        )
        authenticator = Authenticator(
            make_verifier(settings, reactor, self.client.http), settings.require_auth
        )
        self.limits = RateLimits(settings, reactor)
        self.limits.setServiceParent(self)
        self.proxy = Proxy(
            reactor,
            self.client,
            breaker_failures=settings.breaker_failures,
            breaker_reset=settings.breaker_reset,
            retry=RetryPolicy(retries=settings.retries),
            max_in_flight=settings.max_in_flight,
        )
        self.metrics = Metrics()
        # The gauges read the proxy's own counters when scraped.
        self.metrics.watch(in_flight=self.proxy.in_flight, breakers=self.proxy.breakers)
        self.gateway = Gateway(
            settings,
            reactor,
            self.proxy,
            authenticator,
            self.limits,
            metrics=self.metrics,
            readiness=lambda: self.drain.readiness(),
        )
        self.tracker = RequestTracker(self.gateway.resource())
        self.drain = DrainService(
            reactor, self.tracker, self.proxy.breakers, settings.shutdown_grace
        )
        self.drain.setServiceParent(self)
        self.site = GatewaySite(self.tracker, settings, reactor, metrics=self.metrics)
        self.listener = StreamServerEndpointService(
            serverFromString(reactor, settings.port), self.site
        )
        # A port that cannot be bound must stop start-up, not just log.
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self.drain)
        # After the listener: READY=1 once it listens; MultiService stops
        # children in reverse, so STOPPING=1 goes out before the port closes.
        self.notifier = SystemdNotifier(reactor, ready=self.listening)
        self.notifier.setServiceParent(self)

    def listening(self) -> defer.Deferred[Any]:
        """Fires with the listening port once the service has started."""
        return self.listener._waitingForPort

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield self.drain.stopService()
        yield super().stopService()
        yield self.client.close()


class RootService(MultiService):
    """The top of the tree twistd runs: the gateway, and the demo backends
    when asked for."""

    def setServiceParent(self, parent: IServiceCollection) -> None:
        """Also make JSON lines the application's log format under twistd.

        twistd asks the application for an ILogObserver component unless
        ``--logger`` was given, so ``twistd -n deltagw`` logs JSON without
        extra flags.
        """
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, observer())
        super().setServiceParent(parent)
