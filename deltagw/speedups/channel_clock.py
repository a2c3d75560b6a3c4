"""One reactor call per client connection for both of its clocks.

A client connection has two: the request deadline (the whole request within
CLIENT_TIMEOUT, against clients that trickle a request) and twisted.web's
idle timeout (``TimeoutMixin``). Stock, twisted.web turns the idle timeout
off when a request arrives and on again when it is answered, and each time
``TimeoutMixin`` cancels one reactor call and makes another; the gateway's
request deadline would add a third. Kept here as due times, checked by one
reactor call per connection, a request costs no reactor call at all.

This relies on how ``HTTPChannel`` drives ``TimeoutMixin``: it calls
``setTimeout`` and ``resetTimeout`` (never touching ``TimeoutMixin.__timeoutCall``
otherwise) and ends the connection with ``timeoutConnection``;
``tests/integration/test_speedups_shape.py`` checks those names.
"""

from __future__ import annotations

from typing import Any


class OneReactorCall:
    """Mixed in before ``GatewayChannel``: its clocks share one reactor call.

    Overrides the stock hooks ``setTimeout``/``resetTimeout`` of
    ``TimeoutMixin`` and the channel's ``start_request_clock``/
    ``stop_request_clock``.
    """

    _closed: bool
    timeOut: float | None
    site: Any
    callLater: Any

    _request_due: float | None = None
    """When the request being received must be complete (CLIENT_TIMEOUT)."""
    _idle_due: float | None = None
    """When the connection, idle, is closed (twisted.web's ``timeOut``)."""
    _clock_call: Any = None
    """The one reactor call that looks at both."""

    def start_request_clock(self) -> None:
        if self._request_due is None:
            self._request_due = self._due_in(self.site.settings.client_timeout)

    def stop_request_clock(self) -> None:
        self._request_due = None

    def setTimeout(self, period: float | None) -> float | None:  # noqa: N802 (Twisted's name)
        previous, self.timeOut = self.timeOut, period
        self._idle_due = None if period is None else self._due_in(period)
        return previous

    def resetTimeout(self) -> None:  # noqa: N802 (Twisted's name)
        if self._idle_due is not None and self.timeOut is not None:
            self._idle_due = self.site.reactor.seconds() + self.timeOut

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        self._request_due = None
        super().connectionLost(reason)  # type: ignore[misc]
        if self._clock_call is not None and self._clock_call.active():
            self._clock_call.cancel()
        self._clock_call = None

    def _due_in(self, seconds: float) -> float:
        """The time ``seconds`` from now, with the clock call due by then."""
        due = self.site.reactor.seconds() + seconds
        call = self._clock_call
        if call is not None:
            if due < call.getTime():
                call.reset(seconds)
        elif not self._closed:
            self._clock_call = self.callLater(seconds, self._clock_struck)
        return due

    def _clock_struck(self) -> None:
        self._clock_call = None
        now = self.site.reactor.seconds()
        if self._request_due is not None and now >= self._request_due:
            self._request_due = None
            self.request_too_slow()  # type: ignore[attr-defined]
        elif self._idle_due is not None and now >= self._idle_due:
            self._idle_due = None
            self.timeoutConnection()  # type: ignore[attr-defined]
        else:
            pending = [due for due in (self._request_due, self._idle_due) if due is not None]
            if pending:
                # At least a millisecond: a call can come a rounding error early.
                wait = max(min(pending) - now, 0.001)
                self._clock_call = self.callLater(wait, self._clock_struck)
