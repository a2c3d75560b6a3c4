"""Real servers and clients for the integration tests (loopback only).

Upstreams here are real HTTP servers on 127.0.0.1: a recording one whose
answer each test sets, and raw-protocol ones that misbehave on purpose.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from deltagw.config import load_settings
from deltagw.service import GatewayService


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, step: float = 0.01) -> Any:
    """Poll ``predicate`` on the reactor until it is truthy or the deadline passes."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await deferLater(reactor, step, lambda: None)


async def eventually(check: Callable[[], Any], timeout: float = 5.0, step: float = 0.05) -> Any:
    """Like ``wait_until`` for an async check (one that makes requests)."""
    deadline = reactor.seconds() + timeout
    while True:
        value = await check()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await deferLater(reactor, step, lambda: None)


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


Responder = Callable[[server.Request, Seen], Any]


def echo(request: server.Request, seen: Seen) -> bytes:
    """Answer with what was received, as JSON."""
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(
        {"method": seen.method.decode(), "uri": seen.uri.decode(), "body": seen.body.decode("latin-1")}
    ).encode()


class RecordingUpstream(Resource):
    """A well-behaved upstream that records every request it receives."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.respond: Responder = echo
        self.connections_lost = 0

    def render(self, request: server.Request) -> Any:
        request.content.seek(0)
        seen = Seen(
            request.method,
            request.uri,
            [(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            request.content.read(),
        )
        self.seen.append(seen)
        request.notifyFinish().addErrback(self._lost)
        return self.respond(request, seen)

    def _lost(self, _: Any) -> None:
        self.connections_lost += 1


class RawUpstream(protocol.Factory):
    """An upstream speaking raw bytes: ``on_request`` decides what it writes.

    ``on_request(transport, data)`` is called once the request head arrived.
    """

    def __init__(self, on_request: Callable[[Any, bytes], None]) -> None:
        self.on_request = on_request
        self.open = 0
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return _RawUpstreamProtocol(self)


class _RawUpstreamProtocol(protocol.Protocol):
    def __init__(self, factory: RawUpstream) -> None:
        self.factory = factory
        self.buffer = b""
        self.answered = False

    def connectionMade(self) -> None:
        self.factory.open += 1
        self.factory.accepted += 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.answered and b"\r\n\r\n" in self.buffer:
            self.answered = True
            self.factory.on_request(self.transport, self.buffer)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open -= 1


@dataclass
class OneAnswerUpstream:
    """For `RawUpstream`: records each request's bytes, answers with ``answer``, closes."""

    answer: bytes = b""
    received: list[bytes] = field(default_factory=list)

    def on_request(self, transport: Any, data: bytes) -> None:
        self.received.append(data)
        transport.write(self.answer)
        transport.loseConnection()


@dataclass
class Listening:
    port: Any
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"


def listen(factory_or_resource: Any) -> Listening:
    """Listen on a free loopback port (a Resource is wrapped in a Site)."""
    factory = (
        server.Site(factory_or_resource)
        if isinstance(factory_or_resource, Resource)
        else factory_or_resource
    )
    return Listening(reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024))


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    number = port.getHost().port
    port.stopListening()
    return f"http://127.0.0.1:{number}"


def speedups_from_environ() -> dict[str, str]:
    """SPEEDUPS as the test run was given it, so that ``SPEEDUPS=0 pytest``
    runs every in-process gateway on public Twisted only."""
    return {"SPEEDUPS": os.environ["SPEEDUPS"]} if "SPEEDUPS" in os.environ else {}


class RunningGateway:
    """A GatewayService on a free loopback port, with a client pointed at it."""

    def __init__(self, env: dict[str, str]) -> None:
        env = {"PORT": "tcp:0:interface=127.0.0.1:backlog=1024", **speedups_from_environ(), **env}
        self.settings = load_settings(env)
        self.service = GatewayService(self.settings, reactor)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        # A client that keeps no cookies: each test request is a fresh client.
        self.client = treq.client.HTTPClient(
            Agent(reactor, pool=self.pool),
            cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        )

    async def start(self) -> None:
        self.service.startService()
        port = await self.service.listening()
        self.port_number = port.getHost().port
        self.url = f"http://127.0.0.1:{self.port_number}"

    async def stop(self) -> None:
        await self.pool.closeCachedConnections()
        await self.service.stopService()

    async def get(self, path: str, **kwargs: Any) -> Any:
        return await self.client.get(self.url + path, **kwargs)

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self.client.request(method, self.url + path, **kwargs)


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything received until the server closes."""
    received: list[bytes] = []
    closed: defer.Deferred[None] = defer.Deferred()

    class Raw(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(data)

        def dataReceived(self, chunk: bytes) -> None:
            received.append(chunk)

        def connectionLost(self, reason: Any = None) -> None:
            if not closed.called:
                closed.callback(None)

    factory = protocol.ClientFactory.forProtocol(Raw)
    connector = reactor.connectTCP("127.0.0.1", port, factory)
    closed.addTimeout(timeout, reactor, onTimeoutCancel=lambda *_: connector.disconnect())
    await closed
    return b"".join(received)


def open_fds() -> int:
    """File descriptors this process holds open now."""
    return len(os.listdir("/proc/self/fd"))


class BodyReader(protocol.Protocol):
    """A body protocol that records what it is given."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None
        self.finished: defer.Deferred[None] = defer.Deferred()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        assert self.reason is None, "data after connectionLost"
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        assert self.reason is None, "connectionLost twice"
        self.reason = reason
        self.finished.callback(None)


def read_body(response: Any) -> BodyReader:
    """Deliver ``response``'s body to a new `BodyReader`."""
    reader = BodyReader()
    response.deliverBody(reader)
    return reader
