"""The service tree twistd runs: one listening site and the upstream pool.

Tree: ``GatewayService`` > (``RateLimits``, ``DrainService`` > listener).
Stopping drains first (stop listening, let in-flight requests finish), while
the limiter and the pool those requests use still work; then the rest.
"""

from __future__ import annotations

import gc
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService
from twisted.internet import defer
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from deltagw.app import Gateway
from deltagw.auth import CachingVerifier, LocalVerifier, RemoteVerifier, Verifier
from deltagw.authentication import Authenticator
from deltagw.busypoll import BusyPoll
from deltagw.config import ConfigError, Settings
from deltagw.drain import DrainService, RequestTracker
from deltagw.limits import RateLimits
from deltagw.logs import LogFlusher, observer
from deltagw.metrics import Metrics
from deltagw.proxy import Proxy, UpstreamClient
from deltagw.retry import RetryPolicy
from deltagw.site import GatewaySite
from deltagw.systemd import SystemdNotifier
from deltagw.tls import upstream_tls_policy
from deltagw.workers import listen_endpoint


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


GC_THRESHOLDS = (20_000, 20, 20)
"""Collector thresholds while serving (CPython's defaults are 700, 10, 10).

A proxied request leaves no reference cycle of its own (a test checks), so
what it allocates is freed at once and the youngest generation fills only
with what lives on (connections, cached tokens, limiter buckets); at the
default thresholds the collector kept rescanning the 64 requests in flight
(15 % of the gateway's CPU at the time; bench/, py-spy --native). Cycles
made elsewhere (Twisted's connectors, failures) wait a little longer."""

_heap_frozen = False


def _freeze_startup_heap() -> None:
    """Exempt the objects made at start-up from every later full collection.

    Imports, configuration and the route table live as long as the process;
    without this, each full collection walks all of them again (about 50 ms
    a time under load). Done once per process, after collecting what start-up
    left behind so that no garbage is kept for ever.
    """
    global _heap_frozen
    if _heap_frozen:
        return
    _heap_frozen = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


AUTH_FIELDS = (
    "auth_url", "verify_timeout", "verify_cache_ttl", "jwt_secret", "jwt_public_key_file",
    "require_auth",
)
RATE_LIMIT_FIELDS = (
    "rate_limit_requests", "rate_limit_window", "rate_limit_auth_requests",
    "rate_limit_auth_window", "rate_limit_max_keys", "rate_limit_fail_closed", "redis_url",
)


def _differ(old: Settings, new: Settings, names: tuple[str, ...]) -> bool:
    return any(getattr(old, name) != getattr(new, name) for name in names)


class GatewayService(MultiService):
    """The whole gateway: whatever it opens on start it closes on stop.

    Args:
        settings: The validated configuration.
        reactor: The reactor to listen and time on.
    """

    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.client = UpstreamClient(
            reactor,
            settings.max_idle_per_host,
            settings.idle_upstream_timeout,
            upstream_tls_policy(settings),
        )
        self.authenticator = self._authenticator(settings)
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
        self.gateway = self._gateway(settings)
        self.tracker = RequestTracker(self.gateway.resource())
        self.drain = DrainService(
            reactor, self.tracker, self.proxy.breakers, settings.shutdown_grace
        )
        self.drain.setServiceParent(self)
        self.site = GatewaySite(self.tracker, settings, reactor, metrics=self.metrics)
        self.busy_poll = BusyPoll(reactor, settings.busy_poll_us)
        self.busy_poll.setServiceParent(self)
        self.listener = StreamServerEndpointService(
            listen_endpoint(reactor, settings), self.site
        )
        # A port that cannot be bound must stop start-up, not just log.
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self.drain)
        # After the listener: READY=1 once it listens; MultiService stops
        # children in reverse, so STOPPING=1 goes out before the port closes.
        self.notifier = SystemdNotifier(reactor, ready=self.listening)
        self.notifier.setServiceParent(self)

    def _authenticator(self, settings: Settings) -> Authenticator:
        verifier = make_verifier(settings, self.reactor, self.client.http)
        return Authenticator(verifier, settings.require_auth)

    def _gateway(self, settings: Settings) -> Gateway:
        return Gateway(
            settings,
            self.reactor,
            self.proxy,
            self.authenticator,
            self.limits,
            metrics=self.metrics,
            readiness=lambda: self.drain.readiness(),
        )

    def apply_settings(self, settings: Settings) -> None:
        """Serve new requests under ``settings`` (a SIGHUP reload).

        A new Gateway is built and swapped in as the resource; requests in
        flight hold the old one and finish under it. The verification cache
        and the rate-limit buckets are kept unless their own settings
        changed. What the process has already opened (port, pool, breakers)
        keeps its start-up settings (``deltagw.reload.RESTART_ONLY``).
        """
        old = self.settings
        if _differ(old, settings, AUTH_FIELDS):
            self.authenticator = self._authenticator(settings)
        if _differ(old, settings, RATE_LIMIT_FIELDS):
            previous, self.limits = self.limits, RateLimits(settings, self.reactor)
            self.limits.setServiceParent(self)
            previous.disownServiceParent()
        self.gateway = self._gateway(settings)
        self.tracker.wrapped = self.gateway.resource()
        self.site.settings = settings
        self.site.timeOut = settings.client_timeout
        self.busy_poll.microseconds = settings.busy_poll_us
        self.settings = settings

    def startService(self) -> None:
        super().startService()
        # Once the port listens, start-up is over: serving begins. The freeze
        # (a full collection) waits for the reactor's first turn, so that
        # start-up work queued for it (the drain's SIGTERM handler) is done.
        self.listening().addCallback(
            lambda port: (self.reactor.callLater(0, _freeze_startup_heap), port)[1]
        )

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
    when asked for; it also writes the batched log lines (`LogFlusher`)."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        # Not a child: children stop all at once, and the log lines of a
        # drain must keep flowing until the last child has stopped.
        self._log_flusher = LogFlusher(reactor)

    def startService(self) -> None:
        self._log_flusher.startService()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        def stop_flushing(result: Any) -> Any:
            self._log_flusher.stopService()
            return result

        return defer.maybeDeferred(super().stopService).addBoth(stop_flushing)

    def setServiceParent(self, parent: IServiceCollection) -> None:
        """Also make JSON lines the application's log format under twistd.

        twistd asks the application for an ILogObserver component unless
        ``--logger`` was given, so ``twistd -n deltagw`` logs JSON without
        extra flags.
        """
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, observer())
        super().setServiceParent(parent)
