"""The shared cache through a real gateway and real upstreams on loopback (RFC 9111, 9211, 5861)."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.web.server import NOT_DONE_YET

from deltagw.config import load_settings
from deltagw.upstream.breaker import OPEN
from tests.support import RecordingUpstream, listen, wait_until


def _answering(cache_control: bytes | None, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Any:
    """An upstream responder: a JSON body naming the call, with the given fields."""
    calls = [0]

    def respond(request: Any, seen: Any) -> bytes:
        calls[0] += 1
        request.setHeader(b"Content-Type", b"application/json")
        if cache_control is not None:
            request.setHeader(b"Cache-Control", cache_control)
        for name, value in extra:
            request.setHeader(name, value)
        user = dict((k.lower(), v) for k, v in seen.headers).get(b"x-user-id", b"-")
        return json.dumps({"call": calls[0], "user": user.decode()}).encode()

    return respond


def _status(response: Any) -> bytes:
    [value] = response.headers.getRawHeaders(b"cache-status")
    return value


@pytest_twisted.ensureDeferred
async def test_a_fresh_answer_is_stored_then_served_with_age(make_gateway, upstream, access_log):
    """max-age=60: the first GET goes upstream and is stored, the second is a hit with Age;
    the upstream sees one request, the log says miss then hit."""
    upstream.respond = _answering(b"max-age=60")
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)
    first = await gateway.get("/api/data/products")
    first_body = await first.content()
    second = await gateway.get("/api/data/products")
    assert await second.content() == first_body
    assert (first.code, second.code) == (200, 200)
    assert _status(first) == b"deltagw; fwd=uri-miss; stored"
    assert _status(second).startswith(b"deltagw; hit; ttl=")
    assert second.headers.getRawHeaders(b"age") in ([b"0"], [b"1"])
    assert second.length == len(first_body)  # Twisted's client keeps Content-Length as .length
    assert len(upstream.seen) == 1
    await wait_until(lambda: len(access_log) == 2)
    assert [e["cache"] for e in access_log] == ["miss", "hit"]


@pytest_twisted.ensureDeferred
async def test_what_may_not_be_stored_always_goes_upstream(make_gateway, upstream):
    """No lifetime, private, no-store, Set-Cookie: each request is forwarded (Cache-Status: fwd)."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)
    for cache_control, extra in ((None, ()), (b"private, max-age=60", ()),
                                 (b"no-store", ()), (b"max-age=60", ((b"Set-Cookie", b"a=b"),))):
        upstream.respond = _answering(cache_control, extra)
        seen = len(upstream.seen)
        for _ in range(2):
            response = await gateway.get("/api/data/products")
            await response.content()
            assert _status(response) in (b"deltagw; fwd=uri-miss", b"deltagw; fwd=vary-miss")
        assert len(upstream.seen) == seen + 2, cache_control


@pytest_twisted.ensureDeferred
async def test_one_users_answer_never_reaches_another(make_gateway, upstream):
    """A per-user upstream (it answers by X-User-ID): without a word that it may be shared, each
    user's request goes upstream; with public and Vary: X-User-ID, each user gets their own copy."""
    from tests.integration.test_auth_gateway import USERS, AuthStub

    auth = AuthStub()
    listening = listen(auth)
    try:
        gateway = await make_gateway(
            STORAGE_SERVICE_URL=upstream.url, AUTH_SERVICE_URL=listening.url,
            REQUIRE_AUTH="data",
        )
        for cache_control, extra in ((b"max-age=60", ()),
                                     (b"public, max-age=60", ((b"Vary", b"X-User-ID"),))):
            upstream.respond = _answering(cache_control, extra)
            path = "/api/data/underlying/NIFTY?c=" + cache_control.decode()
            users = []
            for token in (b"tok-alice", b"tok-bob", b"tok-alice", b"tok-bob"):
                response = await gateway.get(path, headers={b"Authorization": [b"Bearer " + token]})
                users.append(json.loads(await response.content())["user"])
            assert users == [USERS[b"tok-alice"][0], USERS[b"tok-bob"][0]] * 2
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_concurrent_misses_make_one_upstream_call(make_gateway, upstream):
    """500 concurrent GETs of a cold URL: exactly one reaches the upstream; every client gets
    the same status, fields and bytes."""
    held: list[Any] = []
    upstream.respond = lambda request, seen: (held.append(request), NOT_DONE_YET)[1]
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="0")
    pending = [defer.ensureDeferred(gateway.get("/api/data/chain/NIFTY")) for _ in range(500)]
    await wait_until(lambda: held and gateway.service.cache_fills.waited == 499, timeout=30)
    assert len(held) == 1
    held[0].setHeader(b"Cache-Control", b"max-age=60")
    held[0].setHeader(b"Content-Type", b"application/json")
    held[0].write(b'{"chain": "NIFTY"}')
    held[0].finish()
    responses = await defer.gatherResults(pending)
    bodies = await defer.gatherResults([r.content() for r in responses])
    assert {r.code for r in responses} == {200} and set(bodies) == {b'{"chain": "NIFTY"}'}
    assert {r.headers.getRawHeaders(b"content-type")[0] for r in responses} == {b"application/json"}
    assert len(upstream.seen) == 1


@pytest_twisted.ensureDeferred
async def test_a_stale_copy_answers_while_the_upstream_fails(make_gateway, upstream):
    """stale-if-error: with storage silent past its timeout, a stored (stale) chain still
    answers, marked fwd=stale; without a stored copy the same failure is the usual 503."""
    # Stale on arrival (Age past max-age), and usable for an hour if the upstream fails.
    upstream.respond = _answering(b"max-age=60, stale-if-error=3600", ((b"Age", b"120"),))
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, STORAGE_TIMEOUT="0.5")
    first = await gateway.get("/api/data/chain/NIFTY")
    body = await first.content()
    upstream.respond = lambda request, seen: NOT_DONE_YET
    second = await gateway.get("/api/data/chain/NIFTY")
    assert (second.code, await second.content()) == (200, body)
    assert _status(second).startswith(b"deltagw; fwd=stale; ttl=-")
    third = await gateway.get("/api/data/chain/BANKNIFTY")
    assert (third.code, _status(third)) == (503, b"deltagw; fwd=uri-miss")
    await third.content()


@pytest_twisted.ensureDeferred
async def test_the_rate_limit_and_authentication_run_before_the_cache(make_gateway, upstream):
    """A stored answer is never a way around a 429 or a 401."""
    upstream.respond = _answering(b"public, max-age=60")
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, RATE_LIMIT_REQUESTS="2",
                                 RATE_LIMIT_WINDOW="600")
    codes = []
    for _ in range(3):
        response = await gateway.get("/api/data/products")
        await response.content()
        codes.append(response.code)
    assert codes == [200, 200, 429]
    assert len(upstream.seen) == 1


@pytest_twisted.ensureDeferred
async def test_head_is_answered_from_a_stored_get(make_gateway, upstream):
    """A HEAD after a stored GET: the stored fields and Content-Length, no body, no upstream."""
    upstream.respond = _answering(b"max-age=60")
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)
    get = await gateway.get("/api/data/products")
    body = await get.content()
    head = await gateway.request("HEAD", "/api/data/products")
    assert (head.code, await head.content()) == (200, b"")
    assert head.headers.getRawHeaders(b"content-length") == [b"%d" % len(body)]
    assert _status(head).startswith(b"deltagw; hit")
    assert len(upstream.seen) == 1


@pytest_twisted.ensureDeferred
async def test_cache_off_forwards_everything(make_gateway, upstream):
    """CACHE=0: no Cache-Status, every request reaches the upstream."""
    upstream.respond = _answering(b"max-age=60")
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, CACHE="0")
    for _ in range(2):
        response = await gateway.get("/api/data/products")
        await response.content()
        assert response.headers.getRawHeaders(b"cache-status") is None
    assert len(upstream.seen) == 2


@pytest_twisted.ensureDeferred
async def test_cache_ttl_gives_a_lifetime_to_answers_that_state_none(make_gateway, upstream):
    """CACHE_TTL=data:60: a data answer without Cache-Control is stored; an analytics one is not."""
    upstream.respond = _answering(None)
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url,
                                 ANALYTICS_SERVICE_URL=upstream.url, CACHE_TTL="data:60")
    for path in ("/api/data/products", "/api/analytics/pcr/NIFTY"):
        for _ in range(2):
            await (await gateway.get(path)).content()
    assert [seen.uri for seen in upstream.seen] == [b"/products", b"/pcr/NIFTY", b"/pcr/NIFTY"]


def _failing(code: int, finish: bool = True, lost: list[Any] | None = None) -> Any:
    """An upstream responder that answers ``code``; unfinished, its body never ends."""

    def respond(request: Any, seen: Any) -> Any:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/plain")
        if finish:
            return b"upstream says no"
        request.setHeader(b"Content-Length", b"1000")
        request.write(b"partial")
        if lost is not None:
            request.notifyFinish().addErrback(lost.append)
        return NOT_DONE_YET

    return respond


@pytest_twisted.ensureDeferred
async def test_a_stale_copy_answers_in_place_of_an_upstream_5xx(make_gateway, upstream,
                                                                 access_log):
    """stale-if-error covers a 500, 502, 503 or 504 as well as no answer: the stored copy
    answers with fwd-status, the 5xx's connection is dropped mid-body, and a URL with no
    stored copy gets the upstream's own 5xx."""
    upstream.respond = _answering(b"max-age=60, stale-if-error=3600", ((b"Age", b"120"),))
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)
    first = await gateway.get("/api/data/chain/NIFTY")
    body = await first.content()
    for code in (500, 502, 503, 504):
        upstream.respond = _failing(code)
        stale = await gateway.get("/api/data/chain/NIFTY")
        assert (stale.code, await stale.content()) == (200, body)
        assert _status(stale).startswith(b"deltagw; fwd=stale; fwd-status=%d; ttl=-" % code)
        assert _status(stale).endswith(b"; detail=upstream-error")
    lost: list[Any] = []
    upstream.respond = _failing(503, finish=False, lost=lost)
    stale = await gateway.get("/api/data/chain/NIFTY")
    assert (stale.code, await stale.content()) == (200, body)
    await wait_until(lambda: len(lost) == 1)
    upstream.respond = _failing(503)
    other = await gateway.get("/api/data/chain/BANKNIFTY")
    assert (other.code, await other.content()) == (503, b"upstream says no")
    assert _status(other) == b"deltagw; fwd=uri-miss"
    await wait_until(lambda: len(access_log) == 7)
    assert [e["cache"] for e in access_log] == ["miss"] + ["stale"] * 5 + ["miss"]
    assert len(upstream.seen) == 7


@pytest_twisted.ensureDeferred
async def test_a_5xx_is_relayed_when_the_stored_copy_may_not_be_served_stale(make_gateway,
                                                                           upstream):
    """must-revalidate (RFC 9111 §4.2.4) holds while the upstream fails, and a 501 is not an
    error stale-if-error covers (RFC 5861 §4): both are relayed as the upstream sent them."""
    upstream.respond = _answering(b"max-age=60, must-revalidate", ((b"Age", b"120"),))
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, CACHE_STALE_IF_ERROR="3600")
    await (await gateway.get("/api/data/chain/NIFTY")).content()
    upstream.respond = _failing(500)
    relayed = await gateway.get("/api/data/chain/NIFTY")
    assert (relayed.code, await relayed.content()) == (500, b"upstream says no")
    upstream.respond = _answering(b"max-age=60, stale-if-error=3600", ((b"Age", b"120"),))
    await (await gateway.get("/api/data/chain/BANKNIFTY")).content()
    upstream.respond = _failing(501)
    relayed = await gateway.get("/api/data/chain/BANKNIFTY")
    assert (relayed.code, await relayed.content()) == (501, b"upstream says no")


async def _stored(gateway: Any, *paths: str) -> None:
    """GET each path twice; the second must be a hit, so each is stored."""
    for path in paths:
        for _ in range(2):
            response = await gateway.get(path)
            await response.content()
        assert _status(response).startswith(b"deltagw; hit"), path


async def _purge(gateway: Any, path: str | None = None) -> tuple[int, Any]:
    params = {} if path is None else {"path": path}
    response = await gateway.request("DELETE", "/admin/cache", params=params)
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_an_operator_purges_one_path_a_prefix_or_everything(make_gateway, upstream):
    """DELETE /admin/cache: ?path= forgets one public path (query included, either API prefix),
    a trailing * every URL that starts with it, no path everything; the next GET goes upstream."""
    upstream.respond = _answering(b"max-age=600")
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)
    chains = ["/api/data/chain/NIFTY?expiry=2026-12-31", "/api/data/chain/NIFTY?expiry=2027-01-28",
              "/api/data/chain/BANKNIFTY"]
    await _stored(gateway, "/api/data/products", *chains)
    assert await _purge(gateway, "/api/v1/data/chain/NIFTY?expiry=2026-12-31") == (200, {"purged": 1})
    assert await _purge(gateway, "/api/v1/data/chain/NIFTY?expiry=2026-12-31") == (200, {"purged": 0})
    assert await _purge(gateway, "/api/data/chain/NIFTY*") == (200, {"purged": 1})
    seen = len(upstream.seen)
    again = await gateway.get(chains[0])
    await again.content()
    assert _status(again) == b"deltagw; fwd=uri-miss; stored"
    assert len(upstream.seen) == seen + 1
    banknifty = await gateway.get(chains[2])
    await banknifty.content()
    assert _status(banknifty).startswith(b"deltagw; hit")
    assert await _purge(gateway) == (200, {"purged": 3})
    products = await gateway.get("/api/data/products")
    await products.content()
    assert _status(products) == b"deltagw; fwd=uri-miss; stored"


@pytest_twisted.ensureDeferred
async def test_a_purge_is_refused_outside_admin_allow_and_for_other_paths(make_gateway, upstream):
    """Outside ADMIN_ALLOW a purge is a 404 that forgets nothing; a path that names no cached
    route is a 404 too, two paths a 400; with the cache off a purge forgets nothing."""
    upstream.respond = _answering(b"max-age=600")
    outsider = await make_gateway(STORAGE_SERVICE_URL=upstream.url, ADMIN_ALLOW="10.0.0.0/8")
    await _stored(outsider, "/api/data/products")
    code, body = await _purge(outsider)
    assert (code, body["error"]) == (404, "Not found")
    await _stored(outsider, "/api/data/products")
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)
    for path in ("/api/user/me", "/api/bff/overview/NIFTY", "/api/data/", "/metrics",
                 "/api/data/chain/%4EIFTY", "/api/data/chain/NIFTÝ", "/api/data/chain/..%2f"):
        code, body = await _purge(gateway, path)
        assert (code, body["error"]) == (404, "The path names no cached route"), path
    twice = await gateway.request("DELETE", "/admin/cache?path=/api/data/products&path=/x")
    assert (twice.code, json.loads(await twice.content())["error"]) == (
        400, "Give at most one path to purge")
    off = await make_gateway(STORAGE_SERVICE_URL=upstream.url, CACHE="0")
    assert await _purge(off) == (200, {"purged": 0})


@pytest_twisted.ensureDeferred
async def test_a_reload_turns_the_cache_settings(make_gateway, upstream):
    """SIGHUP's apply_settings: CACHE_TTL then stores what states no lifetime; CACHE=0 forwards
    everything without Cache-Status and frees the store; a new CACHE_MAX_BYTES starts afresh."""
    upstream.respond = _answering(None)
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)

    async def cache_status(**env: str) -> list[bytes] | None:
        if env:
            gateway.service.apply_settings(load_settings({"STORAGE_SERVICE_URL": upstream.url,
                                                          **env}))
        response = await gateway.get("/api/data/products")
        await response.content()
        return response.headers.getRawHeaders(b"cache-status")

    assert await cache_status() == [b"deltagw; fwd=uri-miss"]
    assert await cache_status(CACHE_TTL="data:600") == [b"deltagw; fwd=uri-miss; stored"]
    [hit] = await cache_status(CACHE_TTL="data:600")
    assert hit.startswith(b"deltagw; hit")
    assert await cache_status(CACHE="0", CACHE_TTL="data:600") is None
    assert gateway.service.cache_store.entries == 0
    assert await cache_status(CACHE_TTL="data:600") == [b"deltagw; fwd=uri-miss; stored"]
    assert await cache_status(CACHE_TTL="data:600", CACHE_MAX_BYTES="1000000") == [
        b"deltagw; fwd=uri-miss; stored"]
    assert len(upstream.seen) == 5


@pytest_twisted.ensureDeferred
async def test_with_storage_down_a_recent_chain_still_answers(make_gateway):
    """Storage stops listening: with CACHE_STALE_IF_ERROR the stored chain answers while its
    connections are refused and after its circuit has opened; a chain never stored gets 503."""
    storage = RecordingUpstream()
    # Stale on arrival, so that every request goes upstream; no idle connection is kept.
    storage.respond = _answering(b"max-age=1", ((b"Age", b"5"), (b"Connection", b"close")))
    listening = listen(storage)
    gateway = await make_gateway(STORAGE_SERVICE_URL=listening.url, CACHE_STALE_IF_ERROR="60",
                                 BREAKER_FAILURES="2", RETRIES="0")
    first = await gateway.get("/api/data/chain/NIFTY")
    body = await first.content()
    assert _status(first) == b"deltagw; fwd=uri-miss; stored"
    await listening.port.stopListening()
    for _ in range(4):
        stale = await gateway.get("/api/data/chain/NIFTY")
        assert (stale.code, await stale.content()) == (200, body)
        assert _status(stale).startswith(b"deltagw; fwd=stale; ttl=-")
    assert gateway.service.proxy.breakers["storage"].state == OPEN
    never = await gateway.get("/api/data/chain/BANKNIFTY")
    assert (never.code, json.loads(await never.content())["error"]) == (
        503, "Storage service unavailable")
    assert len(storage.seen) == 1


@pytest_twisted.ensureDeferred
async def test_a_forged_host_cannot_poison_what_others_get(make_gateway, upstream):
    """An upstream that builds its public answer from X-Forwarded-Host (absolute links) and
    forgets Vary: a client sending Host: evil.example gets its own stored copy; every other
    client keeps getting the answer built for the gateway's real name."""

    def reflecting(request: Any, seen: Any) -> bytes:
        request.setHeader(b"Cache-Control", b"public, max-age=600")
        host = request.getHeader(b"x-forwarded-host")
        return b'{"next": "https://%s/api/data/products?page=2"}' % host

    upstream.respond = reflecting
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url)
    forged = await gateway.get("/api/data/products", headers={b"Host": [b"evil.example"]})
    assert b"evil.example" in await forged.content()
    assert _status(forged) == b"deltagw; fwd=uri-miss; stored"
    for _ in range(2):
        honest = await gateway.get("/api/data/products")
        assert b"evil.example" not in await honest.content()
    assert _status(honest).startswith(b"deltagw; hit")
    again = await gateway.get("/api/data/products", headers={b"Host": [b"evil.example"]})
    assert b"evil.example" in await again.content()
    assert _status(again).startswith(b"deltagw; hit")
    assert len(upstream.seen) == 2
    assert await _purge(gateway, "/api/data/products") == (200, {"purged": 2})
