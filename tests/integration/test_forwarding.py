"""The forwarding rules (README: Tracing, forwarding and errors), through a real gateway to a real upstream."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from deltagw import __version__
from tests.support import RawUpstream, listen, raw_exchange


async def _get(gateway, path, **kwargs):
    response = await gateway.get(path, **kwargs)
    return response, await response.content()


@pytest_twisted.ensureDeferred
async def test_query_string_forwarded_whole(gateway, upstream):
    """Every key, repeated keys and their order reach the upstream unchanged."""
    query = "b=2&a=1&a=3&empty=&flag&x=%2F%26%3D&sp=a+b&u=%E2%82%AC"
    response, _ = await _get(gateway, f"/api/data/underlying/NIFTY?{query}")
    assert response.code == 200
    assert upstream.seen[-1].uri == f"/underlying/NIFTY?{query}".encode()


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_answered_in_order(gateway, upstream):
    """Requests a client sends back to back on one connection get their own answers, in order."""
    answer = await raw_exchange(
        gateway.port_number,
        b"GET /api/data/underlying/NIFTY?n=1 HTTP/1.1\r\nHost: gw\r\n\r\n"
        b"GET /api/data/chain/NIFTY?n=2 HTTP/1.1\r\nHost: gw\r\n\r\n"
        b"GET /api/data/products?n=3 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    uris = [json.loads(body)["uri"] for body in _bodies(answer)]
    assert uris == ["/underlying/NIFTY?n=1", "/option/chain/NIFTY?n=2", "/products?n=3"]


def _bodies(stream: bytes) -> list[bytes]:
    """The bodies of consecutive responses framed by Content-Length."""
    bodies = []
    while stream:
        head, _, rest = stream.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        bodies.append(rest[:length])
        stream = rest[length:]
    return bodies


@pytest_twisted.ensureDeferred
async def test_body_forwarded_byte_for_byte(gateway, upstream):
    """A POST body arrives upstream byte for byte with its Content-Type."""
    body = bytes(range(256)) * 40
    response = await gateway.request(
        "POST", "/api/auth/login", data=body, headers={b"Content-Type": [b"application/x-test"]}
    )
    await response.content()
    seen = upstream.seen[-1]
    assert (seen.method, seen.uri, seen.body) == (b"POST", b"/login", body)
    assert seen.header(b"content-type") == [b"application/x-test"]


@pytest_twisted.ensureDeferred
async def test_path_parameter_percent_encoded(gateway, upstream):
    """A path parameter is percent-encoded into the upstream path."""
    await _get(gateway, "/api/v1/data/chain/NIFTY%2050%20%C3%A9%3F%23")
    assert upstream.seen[-1].uri == b"/option/chain/NIFTY%2050%20%C3%A9%3F%23"


@pytest.mark.parametrize(
    "path, status",
    [
        ("/api/data/underlying/a%2Fb", 404),
        ("/api/data/underlying/..", 400),
        ("/api/data/underlying/%2E%2E", 400),
        ("/api/data/underlying/a..b", 400),
        ("/api/data/underlying/%01x", 400),
        ("/api/data/underlying/x%7F", 400),
        ("/api/data/underlying/a%5Cb", 400),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unsafe_path_parameter_never_reaches_upstream(gateway, upstream, path, status):
    """Slashes, dot-dot and control characters in a parameter stop at the gateway."""
    response, body = await _get(gateway, path)
    assert response.code == status
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert "error" in json.loads(body)
    assert upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_upstream_answer_returned_unchanged(gateway, upstream):
    """Status, end-to-end headers and body bytes come back as the upstream sent them."""
    raw_body = b'{"b":  2,\n "a": 1.50}'

    def respond(request, seen):
        request.setResponseCode(418, b"Short and stout")
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"ETag", b'"v1"')
        request.responseHeaders.setRawHeaders(b"X-Multi", [b"one", b"two"])
        return raw_body

    upstream.respond = respond
    response, body = await _get(gateway, "/api/data/products")
    assert (response.code, response.phrase, body) == (418, b"Short and stout", raw_body)
    assert response.headers.getRawHeaders(b"etag") == [b'"v1"']
    assert response.headers.getRawHeaders(b"x-multi") == [b"one", b"two"]
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    assert response.length == len(raw_body)
    raw = await raw_exchange(
        gateway.port_number, b"GET /api/data/products HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, raw_received = raw.partition(b"\r\n\r\n")
    assert raw_received == raw_body
    assert b"\r\nContent-Length: 21\r\n" in head + b"\r\n"
    assert b"content-encoding" not in head.lower()


@pytest_twisted.ensureDeferred
async def test_no_content_type_invented_and_server_is_the_gateways(make_gateway):
    """An upstream answer without Content-Type goes out without one; its Server
    field is not passed on, and the gateway's says deltagw with no version."""

    def answer(transport, _):
        transport.write(b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Length: 2\r\n\r\nok")

    raw = listen(RawUpstream(answer))
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=raw.url)
        request = b"GET /api/data/products HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        head, _, body = (await raw_exchange(gateway.port_number, request)).partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert body == b"ok"
        assert not any(line.startswith(b"content-type:") for line in lines)
        assert [line for line in lines if line.startswith(b"server:")] == [b"server: deltagw"]
        health = await raw_exchange(gateway.port_number, request.replace(b"/api/data/products", b"/health"))
        assert b"\r\nServer: deltagw\r\n" in health
    finally:
        await raw.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_server_field_can_be_left_out(make_gateway, upstream):
    """SERVER_HEADER= (empty): no Server field at all."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, SERVER_HEADER="")
    for path in ("/api/data/products", "/health", "/nowhere"):
        response, _ = await _get(gateway, path)
        assert response.headers.getRawHeaders(b"server") is None, path


@pytest.mark.parametrize("code", [400, 401, 404, 409, 422, 500, 502])
@pytest_twisted.ensureDeferred
async def test_upstream_error_status_passed_through(gateway, upstream, code):
    """An upstream's own 4xx/5xx reaches the client as it is, body included."""

    def respond(request, seen):
        request.setResponseCode(code)
        return b'{"error":"from upstream"}'

    upstream.respond = respond
    response, body = await _get(gateway, "/api/analytics/pcr/NIFTY")
    assert (response.code, body) == (code, b'{"error":"from upstream"}')


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_request_fields_dropped(gateway, upstream):
    """Connection, the fields it names, and the other hop-by-hop fields stay at the gateway."""
    await _get(
        gateway,
        "/api/data/products",
        headers={
            b"Connection": [b"keep-alive, X-Hop"],
            b"X-Hop": [b"secret"],
            b"Keep-Alive": [b"timeout=5"],
            b"TE": [b"trailers"],
            b"Trailer": [b"X-T"],
            b"Upgrade": [b"websocket"],
            b"Proxy-Authorization": [b"Basic eA=="],
            b"X-End-To-End": [b"kept"],
        },
    )
    names = {k.lower() for k, _ in upstream.seen[-1].headers}
    assert names.isdisjoint(
        {b"x-hop", b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-authorization"}
    )
    assert upstream.seen[-1].header(b"x-end-to-end") == [b"kept"]


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_response_fields_dropped(make_gateway):
    """Fields the upstream's Connection header names never reach the client."""

    def answer(transport, _):
        transport.write(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: secret\r\n"
            b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\n"
            b"X-Kept: yes\r\nContent-Length: 2\r\n\r\nok"
        )

    raw = listen(RawUpstream(answer))
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=raw.url)
        response, body = await _get(gateway, "/api/data/products")
        assert (response.code, body) == (200, b"ok")
        names = {k.lower() for k, _ in response.headers.getAllRawHeaders()}
        assert names.isdisjoint({b"x-hop", b"keep-alive", b"proxy-authenticate", b"upgrade"})
        assert response.headers.getRawHeaders(b"x-kept") == [b"yes"]
    finally:
        await raw.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_not_modified_keeps_the_representations_length(make_gateway):
    """A 304 passes on the upstream's Content-Length (the representation's), not a 0 of its own."""

    def answer(transport, _):
        transport.write(
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 600\r\n\r\n'
        )

    raw = listen(RawUpstream(answer))
    try:
        gateway = await make_gateway(STORAGE_SERVICE_URL=raw.url)
        answer_bytes = await raw_exchange(
            gateway.port_number,
            b'GET /api/data/products HTTP/1.1\r\nHost: gw\r\nIf-None-Match: "v1"\r\n'
            b"Connection: close\r\n\r\n",
        )
        head, _, body = answer_bytes.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert lines[0].startswith(b"http/1.1 304") and body == b""
        assert [line for line in lines if line.startswith(b"content-length:")] == [
            b"content-length: 600"
        ]
        assert b'etag: "v1"' in lines
    finally:
        await raw.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_forwarding_fields_added(gateway, upstream):
    """The upstream sees X-Forwarded-For/Proto/Host and the response's X-Request-ID."""
    response, _ = await _get(gateway, "/api/data/products", headers={b"Host": [b"api.example:8443"]})
    seen = upstream.seen[-1]
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"http"]
    assert seen.header(b"x-forwarded-host") == [b"api.example:8443"]
    request_id = response.headers.getRawHeaders(b"x-request-id")
    assert request_id and seen.header(b"x-request-id") == request_id


@pytest_twisted.ensureDeferred
async def test_client_forwarded_for_ignored_from_untrusted_peer(gateway, upstream):
    """Without TRUSTED_PROXIES the upstream sees exactly one entry: the peer."""
    await _get(
        gateway,
        "/api/data/products",
        headers={b"X-Forwarded-For": [b"6.6.6.6"], b"X-Forwarded-Proto": [b"https"]},
    )
    assert upstream.seen[-1].header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert upstream.seen[-1].header(b"x-forwarded-proto") == [b"http"]


@pytest_twisted.ensureDeferred
async def test_client_forwarded_for_kept_from_trusted_proxy(make_gateway, upstream):
    """A trusted proxy's X-Forwarded-For is kept and the peer appended."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, TRUSTED_PROXIES="127.0.0.0/8")
    await _get(gateway, "/api/data/products", headers={b"X-Forwarded-For": [b"203.0.113.9"]})
    assert upstream.seen[-1].header(b"x-forwarded-for") == [b"203.0.113.9, 127.0.0.1"]


@pytest.mark.parametrize(
    "sent, kept",
    [(b"abc-123_x.y:z", True), (b"a" * 128, True), (b"a" * 129, False), (b"bad id", False), (b"", False)],
)
@pytest_twisted.ensureDeferred
async def test_request_id_kept_only_when_well_formed(gateway, upstream, sent, kept):
    """A client's X-Request-ID of 1-128 safe characters is kept, otherwise replaced."""
    response, _ = await _get(gateway, "/api/data/products", headers={b"X-Request-ID": [sent]})
    [returned] = response.headers.getRawHeaders(b"x-request-id")
    assert (returned == sent) is kept
    assert upstream.seen[-1].header(b"x-request-id") == [returned]


@pytest_twisted.ensureDeferred
async def test_client_identity_headers_removed(gateway, upstream):
    """X-User-* headers from a client never reach an upstream."""
    for path in ("/api/data/products", "/api/analytics/pcr/NIFTY"):
        await _get(gateway, path, headers={b"X-User-ID": [b"1"], b"x-user-email": [b"a@b.c"], b"X-User-Role": [b"admin"]})
    response = await gateway.request("POST", "/api/auth/login", data=b"{}", headers={b"X-User-ID": [b"1"]})
    await response.content()
    for seen in upstream.seen:
        assert not any(k.lower().startswith(b"x-user-") for k, _ in seen.headers)


SPOOFED = {
    b"X_User_ID": [b"1"], b"x_user_email": [b"a@b.c"], b"X-USER-ROLE": [b"admin"],
    b"X-Real-IP": [b"6.6.6.6"], b"X_Real_IP": [b"6.6.6.6"], b"True-Client-IP": [b"6.6.6.6"],
    b"CF-Connecting-IP": [b"6.6.6.6"], b"X-Client-IP": [b"6.6.6.6"], b"x_client_ip": [b"6.6.6.6"],
    b"X-Forwarded-Port": [b"1"], b"X_Forwarded_For": [b"6.6.6.6"], b"X-Forwarded-Server": [b"evil"],
    b"Forwarded": [b"for=6.6.6.6"], b"X_Request_ID": [b"forged"], b"X-Kept": [b"yes"],
}
"""Fields naming the client or its identity, in the spellings CGI, WSGI and PHP read alike."""


def _client_naming_fields(seen) -> dict[bytes, list[bytes]]:
    normal = {}
    for name, value in seen.headers:
        normal.setdefault(name.lower().replace(b"_", b"-"), []).append(value)
    return normal


@pytest_twisted.ensureDeferred
async def test_client_naming_fields_removed_in_every_spelling(gateway, upstream):
    """From an untrusted peer, no X-User-*, X-Real-IP, True-Client-IP, CF-Connecting-IP,
    X-Client-IP, X-Forwarded-* or Forwarded of the client's reaches the upstream, `_` or `-`."""
    response, _ = await _get(gateway, "/api/data/products", headers=SPOOFED)
    assert response.code == 200
    fields = _client_naming_fields(upstream.seen[-1])
    assert fields[b"x-forwarded-for"] == [b"127.0.0.1"]
    assert fields[b"forwarded"] == [b"for=127.0.0.1;proto=http;host=\"127.0.0.1:%d\"" % gateway.port_number]
    assert fields[b"x-request-id"] == response.headers.getRawHeaders(b"x-request-id")
    assert fields[b"x-kept"] == [b"yes"]
    for name in (b"x-user-id", b"x-user-email", b"x-user-role", b"x-real-ip", b"true-client-ip",
                 b"cf-connecting-ip", b"x-client-ip", b"x-forwarded-port", b"x-forwarded-server"):
        assert name not in fields


@pytest_twisted.ensureDeferred
async def test_client_naming_fields_kept_from_a_trusted_proxy_but_never_identity(make_gateway, upstream):
    """A trusted proxy's X-Real-IP and X-Forwarded-Port reach the upstream; X-User-* never does."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, TRUSTED_PROXIES="127.0.0.0/8")
    await _get(gateway, "/api/data/products", headers=SPOOFED)
    fields = _client_naming_fields(upstream.seen[-1])
    assert fields[b"x-real-ip"] == [b"6.6.6.6", b"6.6.6.6"]
    assert fields[b"x-forwarded-port"] == [b"1"]
    assert not any(name.startswith(b"x-user-") for name in fields)
    assert fields[b"x-request-id"] != [b"forged"]


@pytest.mark.parametrize("host", [b"api.example", b"api.example:8443", b"[2001:db8::1]:443"])
@pytest_twisted.ensureDeferred
async def test_a_trusted_proxys_valid_forwarded_host_is_continued(make_gateway, upstream, host):
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, TRUSTED_PROXIES="127.0.0.0/8")
    await _get(gateway, "/api/data/products", headers={b"Host": [b"gw"], b"X-Forwarded-Host": [host]})
    assert upstream.seen[-1].header(b"x-forwarded-host") == [host]


@pytest.mark.parametrize("host", [b"a b", b"evil/path", b"x:99999", b"x:123456", b"<script>", b"a@b"])
@pytest_twisted.ensureDeferred
async def test_a_trusted_proxys_invalid_forwarded_host_is_replaced(make_gateway, upstream, host):
    """Only a valid host[:port] is passed on; otherwise the Host the gateway saw."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, TRUSTED_PROXIES="127.0.0.0/8")
    await _get(gateway, "/api/data/products", headers={b"Host": [b"gw"], b"X-Forwarded-Host": [host]})
    assert upstream.seen[-1].header(b"x-forwarded-host") == [b"gw"]


@pytest.mark.parametrize("host", [b"a b", b"evil/path", b"gw:99999", b"gw:123456", b"a@b", b"[::1"])
@pytest_twisted.ensureDeferred
async def test_an_invalid_host_is_400_and_forwards_nothing(gateway, upstream, host):
    answer = await raw_exchange(
        gateway.port_number, b"GET /api/data/products HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b'"Invalid Host header"' in answer
    assert upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_authorization_passed_only_to_logout(gateway, upstream):
    """Only the logout route forwards the client's Authorization header."""
    auth = {b"Authorization": [b"Bearer abc.def.ghi"]}
    await _get(gateway, "/api/data/products", headers=auth)
    response = await gateway.request("POST", "/api/auth/logout", headers=auth)
    await response.content()
    by_uri = {seen.uri: seen for seen in upstream.seen}
    assert by_uri[b"/products"].header(b"authorization") == []
    assert by_uri[b"/logout"].header(b"authorization") == [b"Bearer abc.def.ghi"]


@pytest.mark.parametrize(
    "path, upstream_path",
    [
        ("/api/auth/register", "/register"),
        ("/api/v1/auth/login", "/login"),
        ("/api/data/underlying/NIFTY", "/underlying/NIFTY"),
        ("/api/v1/data/chain/BANKNIFTY", "/option/chain/BANKNIFTY"),
        ("/api/data/products", "/products"),
        ("/api/analytics/pcr/NIFTY", "/pcr/NIFTY"),
        ("/api/v1/analytics/volatility-surface/NIFTY", "/volatility-surface/NIFTY"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_route_table_paths(gateway, upstream, path, upstream_path):
    """Each public route (and its /api/v1 twin) reaches its upstream path."""
    method = "POST" if "/auth/" in path else "GET"
    response = await gateway.request(method, path, data=b"{}" if method == "POST" else None)
    await response.content()
    assert response.code == 200
    assert upstream.seen[-1].uri == upstream_path.encode()


@pytest_twisted.ensureDeferred
async def test_upstream_cookies_not_replayed_to_other_clients(gateway, upstream):
    """Set-Cookie goes to the client that caused it, and is never sent upstream again."""

    def respond(request, seen):
        request.addCookie(b"session", b"user-a")
        return b"{}"

    upstream.respond = respond
    first, _ = await _get(gateway, "/api/data/products")
    assert first.headers.getRawHeaders(b"set-cookie")
    await _get(gateway, "/api/data/products")
    assert upstream.seen[-1].header(b"cookie") == []


@pytest_twisted.ensureDeferred
async def test_upstream_redirect_not_followed(gateway, upstream):
    """A redirect from an upstream is the client's to follow, not the gateway's."""

    def respond(request, seen):
        request.redirect(b"http://elsewhere.invalid/")
        return b""

    upstream.respond = respond
    response, _ = await _get(gateway, "/api/data/products", allow_redirects=False)
    assert response.code == 302
    assert response.headers.getRawHeaders(b"location") == [b"http://elsewhere.invalid/"]
    assert len(upstream.seen) == 1


@pytest_twisted.ensureDeferred
async def test_health(gateway, upstream):
    """/health answers the seed's liveness document without an upstream."""
    response, body = await _get(gateway, "/health")
    assert response.code == 200
    assert json.loads(body) == {"status": "healthy", "service": "api-gateway", "version": __version__}
    assert upstream.seen == []


@pytest_twisted.ensureDeferred
async def test_forwarded_header_added(gateway, upstream):
    """The upstream also gets an RFC 7239 Forwarded element for this hop."""
    await _get(gateway, "/api/data/products", headers={b"Host": [b"api.example:8443"], b"Forwarded": [b"for=6.6.6.6"]})
    assert upstream.seen[-1].header(b"forwarded") == [b'for=127.0.0.1;proto=http;host="api.example:8443"']


@pytest_twisted.ensureDeferred
async def test_forwarded_chain_kept_from_trusted_proxy(make_gateway, upstream):
    """A trusted proxy's Forwarded and X-Forwarded-Proto/Host are continued."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, TRUSTED_PROXIES="127.0.0.1/32")
    await _get(
        gateway,
        "/api/data/products",
        headers={
            b"Host": [b"internal:8000"],
            b"Forwarded": [b'for="[2001:db8::7]";proto=https'],
            b"X-Forwarded-Proto": [b"https"],
            b"X-Forwarded-Host": [b"api.example"],
        },
    )
    seen = upstream.seen[-1]
    assert seen.header(b"forwarded") == [b'for="[2001:db8::7]";proto=https, for=127.0.0.1;proto=http;host="internal:8000"']
    assert seen.header(b"x-forwarded-proto") == [b"https"]
    assert seen.header(b"x-forwarded-host") == [b"api.example"]


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest_twisted.ensureDeferred
async def test_valid_traceparent_continued_with_new_span(gateway, upstream):
    """A valid traceparent keeps its trace id, gets the gateway's span, and tracestate passes."""
    incoming = f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()
    await _get(gateway, "/api/data/products", headers={b"traceparent": [incoming], b"tracestate": [b"vendor=x"]})
    [forwarded] = upstream.seen[-1].header(b"traceparent")
    version, trace_id, span_id, flags = forwarded.decode().split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != "00f067aa0ba902b7" and len(span_id) == 16
    assert upstream.seen[-1].header(b"tracestate") == [b"vendor=x"]


@pytest.mark.parametrize(
    "incoming",
    [
        None,
        b"garbage",
        b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-0000000000000000-01".encode(),
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01".encode(),
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01".encode(),
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra".encode(),
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_traceparent_replaced(gateway, upstream, incoming):
    """A missing or invalid traceparent is replaced by a fresh trace, and tracestate dropped."""
    headers = {b"tracestate": [b"vendor=x"]}
    if incoming is not None:
        headers[b"traceparent"] = [incoming]
    await _get(gateway, "/api/data/products", headers=headers)
    [forwarded] = upstream.seen[-1].header(b"traceparent")
    version, trace_id, span_id, flags = forwarded.decode().split("-")
    assert version == "00" and len(trace_id) == 32 and trace_id not in (TRACE_ID, "0" * 32)
    assert upstream.seen[-1].header(b"tracestate") == []


@pytest_twisted.ensureDeferred
async def test_compressed_body_passed_through_untouched(gateway, upstream):
    """A gzip body goes back byte for byte with its Content-Encoding; the client's Accept-Encoding goes up."""
    import gzip

    compressed = gzip.compress(b'{"ticks": []}' * 100, mtime=0)

    def respond(request, seen):
        request.setHeader(b"Content-Encoding", b"gzip")
        return compressed

    upstream.respond = respond
    raw = await raw_exchange(
        gateway.port_number,
        b"GET /api/data/products HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == compressed
    assert b"\r\nContent-Encoding: gzip" in head
    assert b"\r\nContent-Length: %d" % len(compressed) in head
    assert upstream.seen[-1].header(b"accept-encoding") == [b"gzip"]


@pytest_twisted.ensureDeferred
async def test_no_accept_encoding_invented(gateway, upstream):
    """The gateway asks the upstream for no encoding the client did not ask for."""
    await raw_exchange(
        gateway.port_number, b"GET /api/data/products HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert upstream.seen[-1].header(b"accept-encoding") == []


@pytest_twisted.ensureDeferred
async def test_absolute_form_naming_the_gateway_is_served(make_gateway, upstream):
    """RFC 9112 §3.2.2: an absolute-form target naming the gateway (its address, or
    PUBLIC_URL's host) is served; its authority replaces the Host."""
    gateway = await make_gateway(STORAGE_SERVICE_URL=upstream.url, PUBLIC_URL="https://api.example.com")
    own = b"127.0.0.1:%d" % gateway.port_number
    for target, authority in [
        (b"http://" + own + b"/api/data/products?x=1", own),
        (b"HTTPS://api.example.com:443/api/data/products?x=1", b"api.example.com:443"),
    ]:
        answer = await raw_exchange(
            gateway.port_number,
            b"GET " + target + b" HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:100]
        assert upstream.seen[-1].uri == b"/products?x=1"
        assert upstream.seen[-1].header(b"x-forwarded-host") == [authority]


@pytest.mark.parametrize("target", [
    b"http://evil.example/api/data/products", b"http://127.0.0.1:1/api/data/products",
    b"ftp://127.0.0.1/api/data/products",
])
@pytest_twisted.ensureDeferred
async def test_absolute_form_naming_another_host_is_404_and_never_forwarded(gateway, upstream, target):
    answer = await raw_exchange(
        gateway.port_number, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert upstream.seen == []
