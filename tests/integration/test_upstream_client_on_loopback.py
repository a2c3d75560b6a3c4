"""The strict upstream client against real servers on loopback: keep-alive,
a body ended by the close, a reset before the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss

from deltagw.upstream.client import ConnectionPool, NoResponse
from deltagw.upstream.failures import is_connection_failure
from deltagw.upstream.pools import _UpstreamEndpoints
from tests.support import RawUpstream, RecordingUpstream, listen, read_body, wait_until


@pytest_twisted.async_yield_fixture
async def real_pool() -> AsyncIterator[ConnectionPool]:
    """A pool on the real reactor and TCP endpoints, closed at teardown."""
    pool = ConnectionPool(reactor, _UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS()), 4, 30)
    yield pool
    await pool.close()


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Any]:
    """Listen with a factory or resource on loopback; every port stopped at teardown."""
    ports: list[Any] = []

    def start(factory_or_resource: Any) -> str:
        listening = listen(factory_or_resource)
        ports.append(listening.port)
        return listening.url

    yield start
    for port in ports:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_real_server_keep_alive_reuses_one_connection(real_pool, serve):
    """Two calls to a twisted.web server run on one kept-alive connection."""
    resource = RecordingUpstream()
    channels: list[Any] = []
    resource.respond = lambda request, seen: channels.append(request.channel) or b"pong:" + seen.body
    url = serve(resource).encode()
    bodies = []
    for body in (b"one", b"two"):
        response = await real_pool.request(b"POST", url + b"/ping", [(b"X-A", b"1")], body)
        reader = read_body(response)
        await reader.finished
        assert reader.reason.check(ResponseDone)
        bodies.append(reader.body)
    assert bodies == [b"pong:one", b"pong:two"]
    assert [seen.header(b"x-a") for seen in resource.seen] == [[b"1"], [b"1"]]
    assert len(channels) == 2 and channels[0] is channels[1]
    assert real_pool.idle_count == 1


@pytest_twisted.ensureDeferred
async def test_real_server_closing_after_unframed_body_is_potential_data_loss(real_pool, serve):
    """A body without length, ended by the server closing, arrives whole as PotentialDataLoss."""

    def answer(transport: Any, _: bytes) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000)
        transport.loseConnection()

    url = serve(RawUpstream(answer)).encode()
    reader = read_body(await real_pool.request(b"GET", url + b"/", None, None))
    await reader.finished
    assert reader.reason.check(PotentialDataLoss)
    assert reader.body == b"x" * 100_000
    assert real_pool.idle_count == 0


@pytest_twisted.ensureDeferred
async def test_real_server_reset_before_answer_is_retryable(real_pool, serve):
    """A server resetting the connection before answering fails the call as NoResponse."""
    upstream = RawUpstream(lambda transport, _: transport.abortConnection())
    url = serve(upstream).encode()
    with pytest.raises(NoResponse) as caught:
        await real_pool.request(b"GET", url + b"/", None, None)
    assert is_connection_failure(Failure(caught.value))
    await wait_until(lambda: upstream.open == 0)
