"""Counting the requests being answered, so that a drain knows when it is over.

While draining, responses carry ``Connection: close`` and each connection
closes once its response is written, so keep-alive clients move to another
instance (`deltagw.process.drain`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.web.resource import IResource, Resource

from deltagw.web.site import GatewayChannel, GatewayRequest


class RequestTracker(Resource):
    """Wraps the root resource to count the requests being answered.

    A request counts from the moment it is rendered until its response is
    finished or its client goes away (`GatewayRequest.when_ended`, or
    ``notifyFinish`` for any other request: either fires both ways);
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

    def render(self, request: GatewayRequest) -> Any:
        if self.draining:
            # What twisted.web does for a client that asked for Connection:
            # close (HTTPChannel.checkPersistence): say it, then close after
            # the response, so no new request arrives on this connection.
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            request.channel.persistent = False
        self.in_flight += 1
        channel = request.channel
        if isinstance(request, GatewayRequest):
            # No Deferred for what every request does once.
            request.when_ended(lambda: self._finished(None, channel))
        else:
            request.notifyFinish().addBoth(self._finished, channel)
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
