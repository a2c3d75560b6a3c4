"""`GatewayRequest.when_ended` calls back once: on finish, on a lost client, or at once."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyChannel

from deltagw.web.site import GatewayRequest


def _request() -> GatewayRequest:
    request = GatewayRequest(DummyChannel())
    request.method, request.uri, request.clientproto = b"GET", b"/", b"HTTP/1.1"
    return request


def test_called_once_when_the_response_is_finished() -> None:
    """Each listener is called once the response is finished, not before."""
    request = _request()
    calls: list[str] = []
    request.when_ended(lambda: calls.append("a"))
    request.when_ended(lambda: calls.append("b"))
    assert calls == [] and not request.ended
    request.finish()
    assert calls == ["a", "b"] and request.ended


def test_called_once_when_the_client_is_gone() -> None:
    """A client that leaves before the answer ends the request too."""
    request = _request()
    calls: list[str] = []
    request.when_ended(lambda: calls.append("gone"))
    request.connectionLost(Failure(ConnectionDone()))
    assert calls == ["gone"] and request.ended


def test_a_listener_after_the_end_is_called_at_once() -> None:
    """As notifyFinish on a finished request, asking late still gets an answer."""
    request = _request()
    request.finish()
    calls: list[str] = []
    request.when_ended(lambda: calls.append("late"))
    assert calls == ["late"]
