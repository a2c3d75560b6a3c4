"""Graceful drain: stop accepting, let in-flight requests finish, exit 0.

On SIGTERM (a deploy, ``systemctl stop``, ``docker stop``) the gateway stops
listening at once, so the load balancer's next connection goes to another
instance, and gives the requests it already accepted up to SHUTDOWN_GRACE
seconds to finish with their real responses. While draining,
``/health/ready`` answers 503 and responses carry ``Connection: close`` so
keep-alive clients move elsewhere.

twistd's own SIGTERM handler (``ReactorBase.sigTerm``) stops the reactor
*and* records the signal; after the reactor stops, twistd re-raises it, so
the process dies by signal 15 (exit status 143) however cleanly it drained.
A drain that completed is a normal exit, so `DrainService` replaces that
handler with one that only stops the reactor: the shutdown (and the drain,
in ``stopService``) is the same, the exit status is 0.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from types import FrameType
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.web.resource import IResource, Resource

from deltagw.upstream.breaker import CircuitBreaker
from deltagw.logs import get_logger
from deltagw.web.site import GatewayChannel

_log = get_logger(component="drain")


class RequestTracker(Resource):
    """Wraps the root resource to count the requests being answered.

    A request counts from the moment it is rendered until its response is
    finished or its client goes away (``notifyFinish`` fires either way);
    while draining, until its connection is closed, since a finished
    response may still sit in the socket's buffer.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.in_flight = 0
        self.draining = False
        self._idle: list[defer.Deferred[None]] = []

    def render(self, request: Any) -> Any:
        if self.draining:
            # What twisted.web does for a client that asked for Connection:
            # close (HTTPChannel.checkPersistence): say it, then close after
            # the response, so no new request arrives on this connection.
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            request.channel.persistent = False
        self.in_flight += 1
        request.notifyFinish().addBoth(self._finished, request.channel)
        return self.wrapped.render(request)

    def _finished(self, _: object, channel: Any) -> None:
        if self.draining and isinstance(channel, GatewayChannel):
            # A process that exits now would drop the response's last bytes:
            # close the connection once they are written, and count the
            # request until then.
            channel.transport.loseConnection()
            channel.when_closed().addBoth(self._done)
            return
        self._done(None)

    def _done(self, _: object) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> defer.Deferred[None]:
        """A Deferred that fires once no request is in flight."""
        if self.in_flight == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._idle.remove(d))
        self._idle.append(d)
        return d


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
        tracker: RequestTracker,
        breakers: Mapping[str, CircuitBreaker],
        grace: float,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._tracker = tracker
        self._breakers = breakers
        self._grace = grace
        self._previous_handler: Any = None
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
        """Replace the reactor's SIGTERM handler with ours, if it has one.

        Only a reactor that handles SIGTERM itself (as under twistd) loses
        it; in tests or when embedded, whoever owns the signal keeps it.
        """
        current = signal.getsignal(signal.SIGTERM)
        if self.running and getattr(current, "__self__", None) is self._reactor:
            self._previous_handler = signal.signal(signal.SIGTERM, self._sigterm)

    def _sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Stop the reactor without recording an exit signal (exit status 0).

        Signal-handler context: only ``callFromThread`` is safe here.
        """
        self._reactor.callFromThread(self._stop_reactor)

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
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None

