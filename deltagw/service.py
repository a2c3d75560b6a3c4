"""The service tree twistd runs: one listening site and the upstream pool.

Tree: ``GatewayService`` > (``RateLimits``, ``DrainService`` > `Listener`,
and with SPEEDUPS ``HeldWrites``, ``EventDispatch`` and ``BusyPoll`` from
`deltagw.speedups`).
Stopping drains first (stop listening, let in-flight requests finish), while
the limiter and the pool those requests use still work; then the rest.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import IO, Any

from treq.client import HTTPClient
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from deltagw.cache.coalescing import Coalescer
from deltagw.config import ConfigError, Settings
from deltagw.logs import LogFlusher, get_logger, observer, set_least_level
from deltagw.metrics import Metrics
from deltagw.policy.rate_limits import RateLimits
from deltagw.policy.route_access import Authenticator
from deltagw.policy.token_verifiers import CachingVerifier, LocalVerifier, RemoteVerifier, Verifier
from deltagw.process.drain import DrainService
from deltagw.process.systemd import SystemdNotifier
from deltagw.process.workers import listen_endpoint
from deltagw.speedups.busy_poll import BusyPoll
from deltagw.speedups.clean_fields import CleanFields
from deltagw.speedups.event_dispatch import EventDispatch
from deltagw.speedups.held_writes import HeldWrites
from deltagw.upstream.pools import UpstreamClient
from deltagw.upstream.proxy import Proxy
from deltagw.upstream.retry import RetryPolicy
from deltagw.upstream.tls import upstream_tls_policy
from deltagw.web.application import Gateway
from deltagw.web.early_hits import EarlyHits
from deltagw.web.request_tracker import RequestTracker
from deltagw.web.shared_cache import FillsInProgress, SharedCache, cache_store
from deltagw.web.site import GatewaySite

_log = get_logger(component="service")


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
default thresholds the collector kept rescanning the requests in flight
(a large share of the gateway's CPU under load, by py-spy --native). Cycles
made elsewhere (Twisted's connectors, failures) wait a little longer."""

_heap_frozen = False


def _freeze_startup_heap() -> None:
    """Exempt the objects made at start-up from every later full collection.

    Imports, configuration and the route table live as long as the process;
    without this, each full collection walks all of them again, a pause
    every request in flight waits out. Done once per process, after collecting what start-up
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
    "rate_limit_ipv6_prefix",
)
CACHE_STORE_FIELDS = ("cache_max_bytes", "cache_max_entry_bytes")
"""A change of these starts an empty store (so does turning the cache off: it frees it)."""


def _differ(old: Settings, new: Settings, names: tuple[str, ...]) -> bool:
    return any(getattr(old, name) != getattr(new, name) for name in names)


class Listener(Service):
    """Listens on an endpoint while running; a port it cannot get stops start-up.

    Twisted's ``StreamServerEndpointService`` only logs a failure to listen
    and runs on with no port. Here a failure that the endpoint reports at
    once (a port in use, a missing certificate) ends start-up with one line
    naming the setting; one reported later is logged and makes `listening`
    fail. Listening starts in ``privilegedStartService``, before twistd
    drops privileges (``--uid``).

    Args:
        endpoint: Where to listen.
        factory: The protocol factory of the connections.
        setting: Names the setting in the start-up error (``PORT='tcp:80'``).
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: Any, setting: str = "PORT"
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.setting = setting
        self._listening: defer.Deferred[Any] | None = None
        self._result: IListeningPort | Failure | None = None
        self._waiting: list[defer.Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._result = None
        listening = self.endpoint.listen(self.factory).addBoth(self._settle)
        if isinstance(self._result, Failure):
            listening.addErrback(lambda _: None)  # said once, by the exit line
            raise SystemExit(f"deltagw: {self.setting}: {self._result.getErrorMessage()}")
        self._listening = listening.addErrback(self._failed_later)

    def _settle(self, result: Any) -> Any:
        """Keep the port (or why there is none) and tell whoever waits."""
        self._result = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        return result

    def _failed_later(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            _log.err("listen_failed", _stuff=failure, setting=self.setting)

    def listening(self) -> defer.Deferred[IListeningPort]:
        """Fires with the listening port (or fails) once listening has settled."""
        if isinstance(self._result, Failure):
            return defer.fail(self._result)
        if self._result is not None:
            return defer.succeed(self._result)
        d: defer.Deferred[IListeningPort] = defer.Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def stopService(self) -> defer.Deferred[None]:
        """Stop listening, or stop trying to."""
        super().stopService()
        listening, self._listening = self._listening, None
        result, self._result = self._result, None
        if listening is not None and result is None:
            listening.cancel()
        if result is None or isinstance(result, Failure):
            return defer.succeed(None)
        return defer.maybeDeferred(result.stopListening)


class GatewayService(MultiService):
    """The whole gateway: whatever it opens on start it closes on stop.

    Args:
        settings: The validated configuration.
        reactor: The reactor to listen and time on.
        purge_elsewhere: Called after an HTTP purge of this process's cache,
            to reach the other processes' (a worker's parent).
    """

    def __init__(
        self, settings: Settings, reactor: Any, purge_elsewhere: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self._purge_elsewhere = purge_elsewhere
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
            client_timeout=settings.client_timeout,
        )
        self.metrics = Metrics()
        # The cache outlives settings reloads, as the limiter's buckets do.
        self.cache_store = cache_store(settings)
        self.cache_fills = FillsInProgress()
        self.cache_refreshes: Coalescer[Any] = Coalescer()
        self.metrics.watch_cache(lambda: (self.cache_store, self.cache_fills))
        # The gauges read the proxy's own counters and the limiter's state when scraped.
        self.metrics.watch(
            in_flight=self.proxy.in_flight,
            breakers=self.proxy.breakers,
            limiter_state=lambda: self.limits.readiness()[1]["state"],
        )
        self.gateway = self._gateway(settings)
        self.tracker = RequestTracker(self.gateway.resource())
        self.drain = DrainService(
            reactor, self.tracker, self.proxy.breakers, settings.shutdown_grace
        )
        self.drain.setServiceParent(self)
        self.site = GatewaySite(self.tracker, settings, reactor, metrics=self.metrics)
        self.site.early_hits = self._early_hits()
        self.busy_poll: BusyPoll | None = None
        if settings.speedups:
            HeldWrites().setServiceParent(self)
            CleanFields().setServiceParent(self)
            EventDispatch(reactor).setServiceParent(self)
            self.busy_poll = BusyPoll(reactor, settings.busy_poll_us)
            self.busy_poll.setServiceParent(self)
        self.listener = Listener(
            listen_endpoint(reactor, settings), self.site, f"PORT={settings.port!r}"
        )
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
            readiness=self.readiness,
            cache=self._cache(settings),
        )

    def _cache(self, settings: Settings) -> SharedCache | None:
        if not settings.cache:
            return None
        return SharedCache(
            self.reactor, self.cache_store, self.cache_fills, self.cache_refreshes, self.proxy,
            settings,
            self.metrics,
            self._purge_elsewhere,
        )

    def _early_hits(self) -> EarlyHits | None:
        cache = self.gateway.cache
        return None if cache is None else EarlyHits(self.gateway, cache, self.tracker)

    def purge_cache(self) -> int:
        """Forget every stored answer (SIGUSR2); returns how many there were."""
        return self.cache_store.purge_all()

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """The ``/health/ready`` answer: the drain's, and the rate limiter's.

        Not ready (503) while draining, and while the limiter cannot decide
        as configured (``RateLimits.readiness``): a load balancer then sends
        the first requests to a process whose budget is really shared.
        """
        status, document = self.drain.readiness()
        limiter_ready, document["rate_limiter"] = self.limits.readiness()
        if status == 200 and not limiter_ready:
            return 503, {**document, "status": "not_ready"}
        return status, document

    def apply_settings(self, settings: Settings) -> None:
        """Serve new requests under ``settings`` (a SIGHUP reload).

        A new Gateway is built and swapped in as the resource; requests in
        flight hold the old one and finish under it. The verification cache
        and the rate-limit buckets are kept unless their own settings
        changed. What the process has already opened (port, pool, breakers)
        keeps its start-up settings (``deltagw.process.reload.RESTART_ONLY``).
        """
        old = self.settings
        if _differ(old, settings, AUTH_FIELDS):
            self.authenticator = self._authenticator(settings)
        if _differ(old, settings, RATE_LIMIT_FIELDS):
            previous, self.limits = self.limits, RateLimits(settings, self.reactor)
            self.limits.setServiceParent(self)
            previous.disownServiceParent()
        if _differ(old, settings, CACHE_STORE_FIELDS) or not settings.cache:
            self.cache_store = cache_store(settings)
        self.gateway = self._gateway(settings)
        self.tracker.wrapped = self.gateway.resource()
        self.site.early_hits = self._early_hits()
        self.site.settings = settings
        self.site.timeOut = settings.client_timeout
        if self.busy_poll is not None:
            self.busy_poll.microseconds = settings.busy_poll_us
        set_least_level(settings.log_level)
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
        return self.listener.listening()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield self.drain.stopService()
        yield super().stopService()
        yield self.client.close()


class RootService(MultiService):
    """The top of the tree twistd runs: the gateway, and the demo backends
    when asked for; it also writes the batched log lines (`LogFlusher`)."""

    def __init__(self, reactor: Any, log_stream: IO[str] | None = None) -> None:
        super().__init__()
        self._log_stream = log_stream
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
            parent.setComponent(ILogObserver, observer(self._log_stream))
        super().setServiceParent(parent)
