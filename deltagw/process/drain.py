"""Graceful drain: stop accepting, let in-flight requests finish, exit 0.

On SIGTERM (a deploy, ``systemctl stop``, ``docker stop``) the gateway stops
listening at once, so the load balancer's next connection goes to another
instance, and gives the requests it already accepted up to SHUTDOWN_GRACE
seconds to finish with their real responses. While draining,
``/health/ready`` answers 503 and responses carry ``Connection: close`` so
keep-alive clients move elsewhere.

A drain that completed is a normal exit: `DrainService` takes SIGTERM over
from twistd's reactor (`deltagw.process.signals`), so the shutdown (and the
drain, in ``stopService``) is the same and the exit status is 0, not 143.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any, Protocol

from twisted.application.service import MultiService
from twisted.internet import defer

from deltagw.logs import get_logger
from deltagw.process.signals import SignalHandler
from deltagw.upstream.breaker import CircuitBreaker

_log = get_logger(component="drain")


class InFlightRequests(Protocol):
    """What the drain needs to know of the requests being answered
    (`deltagw.web.request_tracker.RequestTracker`)."""

    draining: bool
    in_flight: int

    def idle(self) -> defer.Deferred[None]:
        """Fires once no request is in flight."""


class DrainService(MultiService):
    """Parent of the listening service; drains on stop, exits 0 on SIGTERM.

    Args:
        reactor: Stops on SIGTERM; times the grace period.
        tracker: Counts the requests in flight.
        breakers: Each upstream's circuit breaker, for ``/health/ready``.
        grace: Seconds in-flight requests get to finish once listening stops.
    """

    def __init__(
        self,
        reactor: Any,
        tracker: InFlightRequests,
        breakers: Mapping[str, CircuitBreaker],
        grace: float,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._tracker = tracker
        self._breakers = breakers
        self._grace = grace
        self._sigterm = SignalHandler(reactor, signal.SIGTERM, self._stop_reactor)
        self._stop_requested = False
        self._stopping: defer.Deferred[None] | None = None

    @property
    def draining(self) -> bool:
        """True from the moment the service starts stopping."""
        return self._tracker.draining

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """The ``/health/ready`` answer: status code and JSON document.

        Ready (200) while serving, whatever the breakers say: an open circuit
        is the gateway working as designed, and taking it out of rotation
        would only move the same dead upstream to another instance. 503 while
        draining, so the load balancer stops sending new connections.
        """
        upstreams = {name: breaker.state for name, breaker in self._breakers.items()}
        if self.draining:
            return 503, {"status": "draining", "upstreams": upstreams}
        return 200, {"status": "ready", "upstreams": upstreams}

    def startService(self) -> None:
        super().startService()
        # twistd starts services before reactor.run(), and the reactor
        # installs its signal handlers while starting up: wait for that.
        self._reactor.callWhenRunning(self._take_sigterm)

    def _take_sigterm(self) -> None:
        if self.running:
            self._sigterm.install_if_the_reactor_owns_it()

    def _stop_reactor(self) -> None:
        if self._stop_requested:
            return  # a second SIGTERM while draining changes nothing
        self._stop_requested = True
        _log.msg("shutdown_requested", signal="SIGTERM", grace_s=self._grace)
        self._reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        """Stop listening, then wait up to the grace period for in-flight requests.

        Idempotent: the gateway stops this first, then its other services
        (which include this one) once the drain is over.
        """
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._drain())
        return self._stopping

    async def _drain(self) -> None:
        self._tracker.draining = True
        try:
            await super().stopService()  # the listening port closes
            in_flight = self._tracker.in_flight
            _log.msg("drain_started", in_flight=in_flight, grace_s=self._grace)
            idle = self._tracker.idle()
            idle.addTimeout(self._grace, self._reactor)
            try:
                await idle
            except defer.TimeoutError:
                _log.msg("drain_timeout", in_flight=self._tracker.in_flight, grace_s=self._grace)
                return
            _log.msg("drain_finished", drained=in_flight)
        finally:
            # Only now: a second SIGTERM during the drain must not reach the
            # reactor's handler, which would make the exit status 143.
            self._sigterm.restore()

