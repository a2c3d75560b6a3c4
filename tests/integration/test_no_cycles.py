"""A forwarded request leaves no reference cycle of the gateway's own behind."""

from __future__ import annotations

import gc
from types import CellType
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import RecordingUpstream, RunningGateway, listen

_PER_REQUEST = {"GatewayRequest", "UpstreamResponse", "_Connection", "_BodyRelay", "Decision"}


def _made_for_requests(obj: Any, gateway: RunningGateway) -> bool:
    """An object a request made, or a closure over this gateway's own parts.

    (Long-lived objects of gateways that earlier tests stopped may become
    garbage at any moment; they are not what this test is about.)
    """
    if isinstance(obj, CellType):
        service = gateway.service
        try:
            contents = obj.cell_contents
        except ValueError:  # an empty cell
            return False
        return any(contents is part for part in (service.proxy, service.gateway, service.site))
    return type(obj).__module__.startswith("deltagw") and type(obj).__name__ in _PER_REQUEST


@pytest_twisted.ensureDeferred
async def test_forwarded_requests_leave_no_cyclic_garbage_of_ours() -> None:
    """Everything a proxied request makes is freed by reference counting, not left
    for the collector (a cycle per request made the collector run all the time)."""
    upstream = listen(RecordingUpstream())
    gateway = RunningGateway({"STORAGE_SERVICE_URL": upstream.url})
    await gateway.start()
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    try:
        for _ in range(3):  # connections and caches made once
            await (await client.get(gateway.url + "/api/data/products")).content()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(10):
                response = await client.get(gateway.url + "/api/data/products")
                assert response.code == 200
                await response.content()
            gc.collect()
            ours = [o for o in gc.garbage if _made_for_requests(o, gateway)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert ours == [], sorted({type(o).__qualname__ + " " + getattr(o, "__qualname__", "") for o in ours})
    finally:
        await pool.closeCachedConnections()
        await gateway.stop()
        await upstream.port.stopListening()
