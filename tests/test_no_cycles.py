"""A forwarded request leaves no reference cycle of the gateway's own behind."""

from __future__ import annotations

import gc
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import RecordingUpstream, RunningGateway, listen


def _ours(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "") or ""
    return module.startswith("deltagw")


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
            ours = [o for o in gc.garbage if _ours(o)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert ours == []
    finally:
        await pool.closeCachedConnections()
        await gateway.stop()
        await upstream.port.stopListening()
