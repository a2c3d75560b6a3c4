"""Which budget a request spends, and from which limiter.

Every ``/api`` route spends from a token bucket keyed by the verified user,
or else by the client address; the auth group has its own stricter budget
against password guessing; meta routes (health, docs, metrics) never spend.
With REDIS_URL the buckets live in Redis so every gateway process shares
them.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

from deltagw.config import Settings
from deltagw.errors import RateLimited, RateLimiterUnavailable
from deltagw.policy.buckets import Decision, RedisLimiter, RedisUnavailable, TokenBucketLimiter
from deltagw.policy.token_verifiers import Identity
from deltagw.routes import Route

REDIS_TIMEOUT = 0.05
"""Seconds a Redis decision may take before the limiter fails open (or closed)."""


def redis_endpoint(reactor: Any, url: str) -> tuple[Any, str | None, int]:
    """Endpoint, password and database number of a ``redis://`` or ``unix://`` URL."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return UNIXClientEndpoint(reactor, parts.path), parts.password, 0
    db = int(parts.path.strip("/") or 0)
    endpoint = HostnameEndpoint(reactor, parts.hostname or "localhost", parts.port or 6379)
    return endpoint, parts.password, db


@functools.lru_cache(maxsize=4096)
def address_key(client: str, ipv6_prefix: int) -> str:
    """The bucket key of a client address.

    An IPv6 client is keyed by its network of ``ipv6_prefix`` bits
    (RATE_LIMIT_IPV6_PREFIX, 64 by default): one host commonly holds a
    whole /64, and a bucket per address would let it take as many budgets as
    it likes. An IPv4-mapped IPv6 address is its IPv4 address.
    """
    if ":" not in client:
        return f"ip:{client}"
    try:
        address = ipaddress.IPv6Address(client.split("%", 1)[0])
    except ValueError:
        return f"ip:{client}"
    if address.ipv4_mapped is not None:
        return f"ip:{address.ipv4_mapped}"
    network = ipaddress.IPv6Network((int(address), ipv6_prefix), strict=False)
    return f"ip:{network}"


class NotAtOnce(Exception):
    """`RateLimits.check_at_once` cannot allow the request without waiting."""


class RateLimits(Service):
    """The gateway's limiters, one per budget, started and stopped as a service.

    Args:
        settings: RATE_LIMIT_* and REDIS_URL.
        reactor: Clock for the in-process buckets and network for Redis.
    """

    def __init__(self, settings: Settings, reactor: Any) -> None:
        self._ipv6_prefix = settings.rate_limit_ipv6_prefix
        self._limiters: dict[str, Any] = {}
        budgets = {
            "default": (settings.rate_limit_requests, settings.rate_limit_window),
            "auth": (settings.rate_limit_auth_requests, settings.rate_limit_auth_window),
        }
        for policy, (capacity, window) in budgets.items():
            if capacity == 0:
                continue
            if settings.redis_url:
                endpoint, password, db = redis_endpoint(reactor, settings.redis_url)
                self._limiters[policy] = RedisLimiter(
                    reactor, endpoint, capacity, window, policy=policy, timeout=REDIS_TIMEOUT,
                    fail_open=not settings.rate_limit_fail_closed, password=password, db=db,
                )
            else:
                self._limiters[policy] = TokenBucketLimiter(
                    reactor, capacity, window, max_keys=settings.rate_limit_max_keys, policy=policy
                )

    @staticmethod
    def policy(route: Route) -> str | None:
        """The budget a route spends from; None for routes that are never limited."""
        if route.group == "meta":
            return None
        return "auth" if route.group == "auth" else "default"

    async def check(self, route: Route, client: str, identity: Identity | None) -> Decision | None:
        """Spend one token for this request.

        Returns:
            The decision (its headers go on the response), or None when the
            route or budget is not limited.

        Raises:
            RateLimited: over budget (429).
            RateLimiterUnavailable: Redis could not decide and the limiter
                fails closed (503).
        """
        limiter = self._limiters.get(self.policy(route) or "")
        if limiter is None:
            return None
        if identity and route.group != "auth":
            key = f"user:{identity.user_id}"
        else:
            key = address_key(client, self._ipv6_prefix)
        decision = limiter.consume(key)
        if isinstance(decision, defer.Deferred):
            try:
                decision = await decision
            except RedisUnavailable:
                raise RateLimiterUnavailable() from None
        if not decision.allowed:
            raise RateLimited(headers=decision.headers())
        return decision

    def check_at_once(self, route: Route, client: str) -> Decision | None:
        """Spend one token of an anonymous request's budget, if that is decided at once.

        Returns:
            The decision, or None when the route or budget is not limited.

        Raises:
            NotAtOnce: the budget lives in Redis (an answer takes a round
                trip), or the request is refused. A refusal leaves the
                bucket as it was, so `check` decides the request again
                and gives its 429.
        """
        limiter = self._limiters.get(self.policy(route) or "")
        if limiter is None:
            return None
        if not isinstance(limiter, TokenBucketLimiter):
            raise NotAtOnce()
        decision = limiter.consume(address_key(client, self._ipv6_prefix))
        if not decision.allowed:
            raise NotAtOnce()
        return decision

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Whether every limiter decides as configured, and their backend and state.

        A Redis limiter is not ready until its first connection attempt is
        over, nor while Redis is unreachable under RATE_LIMIT_FAIL_CLOSED
        (every limited request would get a 503). The state reported is the
        least ready of the limiters': each budget has its own connection.
        """
        limiters = list(self._limiters.values())
        if not limiters:
            return True, {"backend": "off", "state": "off"}
        states = {limiter.state for limiter in limiters}
        state = next(s for s in ("connecting", "unavailable", "connected", "ready") if s in states)
        return all(limiter.ready for limiter in limiters), {
            "backend": limiters[0].backend, "state": state,
        }

    @property
    def limiters(self) -> dict[str, Any]:
        """The limiter of each budget, by policy name (read-only use)."""
        return dict(self._limiters)

    def startService(self) -> None:
        super().startService()
        for limiter in self._limiters.values():
            limiter.start()

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        return defer.gatherResults(
            [defer.maybeDeferred(limiter.stop) for limiter in self._limiters.values()]
        )
