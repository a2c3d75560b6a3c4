"""Edge authentication through a real gateway and a real (stub) auth service."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.web.server import NOT_DONE_YET

from tests.support import RecordingUpstream, closed_port_url, eventually, listen, wait_until

USERS = {b"tok-alice": ("17", "alice@example.com"), b"tok-bob": ("23", "bob@example.com")}


class AuthStub(RecordingUpstream):
    """An auth service whose /verify knows USERS; tokens can be revoked."""

    def __init__(self) -> None:
        super().__init__()
        self.revoked: set[bytes] = set()
        self.hold: list[defer.Deferred] | None = None
        self.respond = self._answer

    def verifications(self) -> int:
        return sum(1 for seen in self.seen if seen.uri == b"/verify")

    def _answer(self, request, seen):
        if seen.uri != b"/verify":
            return b"{}"
        token = json.loads(seen.body)["token"].encode()
        if self.hold is not None:
            waiting: defer.Deferred = defer.Deferred()
            self.hold.append(waiting)
            waiting.addCallback(lambda _: (request.write(self._verdict(request, token)), request.finish()))
            return NOT_DONE_YET
        return self._verdict(request, token)

    def _verdict(self, request, token):
        if token in USERS and token not in self.revoked:
            user_id, email = USERS[token]
            return json.dumps({"valid": True, "user_id": user_id, "email": email}).encode()
        request.setResponseCode(401)
        return b'{"error":"Invalid token"}'


@pytest_twisted.async_yield_fixture
async def auth():
    stub = AuthStub()
    listening = listen(stub)
    stub.url = listening.url
    yield stub
    await listening.port.stopListening()


def _bearer(token: bytes) -> dict:
    return {b"Authorization": [b"Bearer " + token]}


async def _json(response):
    return json.loads(await response.content())


@pytest_twisted.async_yield_fixture
async def edge(make_gateway, auth, upstream):
    yield await make_gateway(
        AUTH_SERVICE_URL=auth.url, STORAGE_SERVICE_URL=upstream.url, ANALYTICS_SERVICE_URL=upstream.url
    )


@pytest.mark.parametrize("path", ["/api/user/me", "/api/v1/user/me"])
@pytest_twisted.ensureDeferred
async def test_user_me_returns_identity(edge, path):
    """A valid token gets its user id and email back."""
    response = await edge.get(path, headers=_bearer(b"tok-alice"))
    assert response.code == 200
    assert await _json(response) == {"user_id": "17", "email": "alice@example.com"}


@pytest_twisted.ensureDeferred
async def test_missing_header_is_401_with_challenge(edge):
    """No Authorization header: 401 "Missing Authorization header" and a bare Bearer challenge."""
    response = await edge.get("/api/user/me")
    assert response.code == 401
    assert (await _json(response))["error"] == "Missing Authorization header"
    assert response.headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="deltastream"']


@pytest.mark.parametrize(
    "header",
    [b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"Bearer a b", b"Bearer t\xc3\xa9k", b"Bearer " + b"a" * 5000, b"tok-alice"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_header_is_401_invalid_token(edge, auth, header):
    """Malformed credentials are 401 "Invalid token" with error="invalid_token", and never verified."""
    response = await edge.get("/api/user/me", headers={b"Authorization": [header]})
    assert response.code == 401
    assert (await _json(response))["error"] == "Invalid token"
    assert response.headers.getRawHeaders(b"www-authenticate") == [
        b'Bearer realm="deltastream", error="invalid_token"'
    ]
    assert auth.verifications() == 0


@pytest_twisted.ensureDeferred
async def test_scheme_is_case_insensitive(edge):
    """`bearer` and `BEARER` are the same scheme (RFC 6750)."""
    for scheme in (b"bearer", b"BEARER"):
        response = await edge.get("/api/user/me", headers={b"Authorization": [scheme + b" tok-bob"]})
        assert (await _json(response))["user_id"] == "23"


@pytest_twisted.ensureDeferred
async def test_rejected_token_is_401(edge):
    """A token the auth service rejects is 401 "Invalid token"."""
    response = await edge.get("/api/user/me", headers=_bearer(b"tok-mallory"))
    assert response.code == 401
    assert (await _json(response))["error"] == "Invalid token"


@pytest.mark.parametrize("mode", ["refused", "slow", "garbage", "error"])
@pytest_twisted.ensureDeferred
async def test_auth_outage_is_503_not_401(make_gateway, upstream, mode):
    """Auth unreachable, slower than VERIFY_TIMEOUT, garbage or 5xx: 503 with Retry-After."""
    stub = RecordingUpstream()
    if mode == "slow":
        stub.respond = lambda request, seen: NOT_DONE_YET
    elif mode == "garbage":
        stub.respond = lambda request, seen: b"<html>not json</html>"
    elif mode == "error":
        stub.respond = lambda request, seen: (request.setResponseCode(502), b"{}")[1]
    listening = listen(stub)
    try:
        url = closed_port_url() if mode == "refused" else listening.url
        gateway = await make_gateway(AUTH_SERVICE_URL=url, VERIFY_TIMEOUT="0.2")
        response = await gateway.get("/api/user/me", headers=_bearer(b"tok-alice"))
        assert response.code == 503
        assert (await _json(response))["error"] == "Auth service unavailable"
        assert response.headers.getRawHeaders(b"retry-after")
    finally:
        await listening.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_share_one_verification(make_gateway, auth):
    """500 concurrent requests with one new token cost exactly one /verify."""
    edge = await make_gateway(AUTH_SERVICE_URL=auth.url, VERIFY_TIMEOUT="60", RATE_LIMIT_REQUESTS="0")
    auth.hold = []
    requests = [
        defer.ensureDeferred(edge.get("/api/user/me", headers=_bearer(b"tok-alice")))
        for _ in range(500)
    ]
    # Hold the one verification until all 500 requests are inside the gateway.
    await wait_until(lambda: edge.service.tracker.in_flight == 500 and auth.hold, timeout=20)
    for waiting in auth.hold:
        waiting.callback(None)
    responses = await defer.gatherResults(requests)
    assert {r.code for r in responses} == {200}
    for r in responses:
        await r.content()
    assert auth.verifications() == 1


@pytest_twisted.ensureDeferred
async def test_revocation_immediate_without_cache(make_gateway, auth):
    """With VERIFY_CACHE_TTL=0 a revoked token is refused on the very next request."""
    gateway = await make_gateway(AUTH_SERVICE_URL=auth.url, VERIFY_CACHE_TTL="0")
    assert (await gateway.get("/api/user/me", headers=_bearer(b"tok-bob"))).code == 200
    auth.revoked.add(b"tok-bob")
    assert (await gateway.get("/api/user/me", headers=_bearer(b"tok-bob"))).code == 401


@pytest_twisted.ensureDeferred
async def test_revocation_within_ttl_with_cache(make_gateway, auth):
    """With a TTL, a revoked token is still served from cache, then refused once the TTL passes."""
    gateway = await make_gateway(AUTH_SERVICE_URL=auth.url, VERIFY_CACHE_TTL="0.5")
    assert (await gateway.get("/api/user/me", headers=_bearer(b"tok-bob"))).code == 200
    auth.revoked.add(b"tok-bob")
    assert (await gateway.get("/api/user/me", headers=_bearer(b"tok-bob"))).code == 200
    assert auth.verifications() == 1

    async def refused():
        return (await gateway.get("/api/user/me", headers=_bearer(b"tok-bob"))).code == 401

    await eventually(refused, timeout=3)
    assert auth.verifications() == 2


@pytest_twisted.ensureDeferred
async def test_required_groups_need_token_and_carry_identity(make_gateway, auth, upstream):
    """With REQUIRE_AUTH=data, data routes need a token and the upstream gets the identity."""
    gateway = await make_gateway(
        AUTH_SERVICE_URL=auth.url,
        STORAGE_SERVICE_URL=upstream.url,
        ANALYTICS_SERVICE_URL=upstream.url,
        REQUIRE_AUTH="data",
    )
    refused = await gateway.get("/api/data/products")
    assert refused.code == 401
    assert upstream.seen == []
    allowed = await gateway.get("/api/data/products", headers=_bearer(b"tok-alice"))
    await allowed.content()
    assert upstream.seen[-1].header(b"x-user-id") == [b"17"]
    assert upstream.seen[-1].header(b"x-user-email") == [b"alice@example.com"]
    public = await gateway.get("/api/analytics/pcr/NIFTY")
    await public.content()
    assert public.code == 200


@pytest_twisted.ensureDeferred
async def test_public_route_ignores_bad_token(edge, upstream):
    """On a public route an invalid token is ignored: forwarded without identity."""
    response = await edge.get("/api/data/products", headers=_bearer(b"tok-mallory"))
    await response.content()
    assert response.code == 200
    assert upstream.seen[-1].header(b"x-user-id") == []


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/api/auth/login"),
        ("POST", "/api/auth/logout"),
        ("GET", "/api/data/products"),
        ("GET", "/api/data/underlying/NIFTY"),
        ("GET", "/api/analytics/volatility-surface/NIFTY"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_spoofed_identity_never_reaches_upstream(edge, auth, upstream, method, path):
    """Client-sent X-User-* never reaches an upstream; only verified identity does."""
    spoof = {**_bearer(b"tok-alice"), b"X-User-ID": [b"1"], b"X-User-Email": [b"root@x"], b"X-User-Admin": [b"1"]}
    response = await edge.request(method, path, headers=spoof, data=b"{}" if method == "POST" else None)
    await response.content()
    [seen] = [s for s in upstream.seen if s.uri != b"/verify"] or [s for s in auth.seen if s.uri != b"/verify"]
    user_headers = [(k.lower(), v) for k, v in seen.headers if k.lower().startswith(b"x-user-")]
    assert user_headers in ([], [(b"x-user-id", b"17"), (b"x-user-email", b"alice@example.com")])
    if path.startswith("/api/data") or path.startswith("/api/analytics"):
        assert user_headers == [(b"x-user-id", b"17"), (b"x-user-email", b"alice@example.com")]


@pytest_twisted.ensureDeferred
async def test_tokens_never_logged_user_id_is(edge):
    """The access log carries user_id; no log line contains the token or Authorization."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        response = await edge.get("/api/data/products", headers=_bearer(b"tok-alice"))
        await response.content()
        await edge.get("/api/user/me", headers=_bearer(b"tok-mallory"))
        await wait_until(lambda: sum("outgoing_response" in str(e.get("message")) for e in events) >= 2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(str(e.get("message", "")) + str(e.get("log_format", "")) for e in events)
    assert "tok-alice" not in text and "tok-mallory" not in text
    assert "authorization" not in text.lower()
    access = [json.loads(str(e["message"][0])) for e in events if "outgoing_response" in str(e.get("message"))]
    assert access[0]["user_id"] == "17"


@pytest_twisted.async_yield_fixture
async def demo_auth(tmp_path):
    """The demo auth service (real JWTs, SQLite, revocation) on a loopback port."""
    from twisted.internet import reactor

    from deltagw.demo.platform import DemoPlatform

    platform = DemoPlatform(reactor, str(tmp_path), jwt_secret="test-secret-of-thirty-two-bytes-at-least", scrypt_n=2**4)
    platform.privilegedStartService()
    platform.startService()
    yield platform.urls["auth"]
    await platform.stopService()


@pytest.mark.parametrize("ttl", ["0", "10"])
@pytest_twisted.ensureDeferred
async def test_demo_auth_logout_revokes_through_gateway(make_gateway, demo_auth, ttl):
    """Against the demo auth service: a logged-out token is refused at once with TTL 0, cached otherwise."""
    gateway = await make_gateway(AUTH_SERVICE_URL=demo_auth, VERIFY_CACHE_TTL=ttl)
    registered = await gateway.request(
        "POST",
        "/api/auth/register",
        json={"email": "edge@example.com", "password": "long-enough", "name": "Edge"},
    )
    token = (await _json(registered))["token"].encode()
    me = await gateway.get("/api/user/me", headers=_bearer(token))
    assert (await _json(me))["email"] == "edge@example.com"
    logout = await gateway.request("POST", "/api/auth/logout", headers=_bearer(token))
    assert logout.code == 200
    await logout.content()
    after = await gateway.get("/api/user/me", headers=_bearer(token))
    await after.content()
    assert after.code == (401 if ttl == "0" else 200)


@pytest_twisted.ensureDeferred
async def test_local_verification_makes_no_auth_call(make_gateway, auth):
    """With JWT_SECRET tokens are checked in-process: valid ones pass, forged ones fail, auth is never called."""
    import time

    import jwt

    secret = "local-verification-secret-of-32-bytes!"
    gateway = await make_gateway(AUTH_SERVICE_URL=auth.url, JWT_SECRET=secret)
    now = int(time.time())
    claims = {"sub": "42", "email": "local@example.com", "iat": now, "exp": now + 300}
    good = jwt.encode(claims, secret, algorithm="HS256").encode()
    forged = jwt.encode(claims, "another-secret-of-thirty-two-bytes!!", algorithm="HS256").encode()
    unsigned = jwt.encode(claims, None, algorithm="none").encode()
    response = await gateway.get("/api/user/me", headers=_bearer(good))
    assert await _json(response) == {"user_id": "42", "email": "local@example.com"}
    for token in (forged, unsigned):
        refused = await gateway.get("/api/user/me", headers=_bearer(token))
        await refused.content()
        assert refused.code == 401
    assert auth.verifications() == 0


def _b64(data: bytes) -> bytes:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _hand_signed(header: dict, claims: dict, key: bytes) -> bytes:
    """A JWT signed with HMAC-SHA256 by hand: PyJWT refuses a PEM as an HMAC secret."""
    import hashlib
    import hmac

    signing_input = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(claims).encode())
    return signing_input + b"." + _b64(hmac.new(key, signing_input, hashlib.sha256).digest())


@pytest_twisted.ensureDeferred
async def test_hostile_tokens_against_a_public_key(make_gateway, auth, upstream, tmp_path):
    """JWT_PUBLIC_KEY_FILE (RS256): alg confusion (HS256 keyed with the public key), alg none,
    kid tricks, expiry past the 30 s leeway and nbf in the future are 401; no identity
    reaches the upstream; a good token passes."""
    import time

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(public_pem)
    gateway = await make_gateway(
        AUTH_SERVICE_URL=auth.url, STORAGE_SERVICE_URL=upstream.url,
        JWT_PUBLIC_KEY_FILE=str(key_file), REQUIRE_AUTH="data", RATE_LIMIT_REQUESTS="0",
    )
    now = int(time.time())
    claims = {"sub": "42", "email": "x@example.com", "exp": now + 300}
    hostile = {
        "alg-confusion": _hand_signed({"alg": "HS256", "typ": "JWT"}, claims, public_pem),
        "alg-none": jwt.encode(claims, None, algorithm="none").encode(),
        "kid-traversal": jwt.encode(claims, "s" * 32, algorithm="HS256",
                                    headers={"kid": "../../../../dev/null"}).encode(),
        "kid-unknown-rs256": jwt.encode(
            claims, rsa.generate_private_key(public_exponent=65537, key_size=2048),
            algorithm="RS256", headers={"kid": "other"}).encode(),
        "expired-past-leeway": jwt.encode({**claims, "exp": now - 60}, private, algorithm="RS256").encode(),
        "not-yet-valid": jwt.encode({**claims, "nbf": now + 120}, private, algorithm="RS256").encode(),
        "no-exp": jwt.encode({"sub": "42"}, private, algorithm="RS256").encode(),
    }
    for name, token in hostile.items():
        response = await gateway.get("/api/data/products", headers=_bearer(token))
        await response.content()
        assert response.code == 401, name
    assert upstream.seen == []
    good = jwt.encode({**claims, "exp": now - 10}, private, algorithm="RS256").encode()  # within leeway
    response = await gateway.get("/api/data/products", headers=_bearer(good))
    await response.content()
    assert response.code == 200
    assert [s.header(b"x-user-id") for s in upstream.seen] == [[b"42"]]
    assert auth.verifications() == 0
