"""TLS both ways, with certificates made on the fly (trustme)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
import trustme
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.server import Site

from tests.support import RecordingUpstream, RunningGateway, wait_until


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def _server_options(ca, identity: str, client_ca=None):
    cert = ca.issue_cert(identity)
    private = ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes())
    if client_ca is None:
        return private.options()
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        verify=True,
        caCerts=[ssl.Certificate.loadPEM(client_ca.cert_pem.bytes()).original],
        requireCertificate=True,
    )


@pytest_twisted.async_yield_fixture
async def https_upstream(ca):
    """An HTTPS upstream on 127.0.0.1 whose certificate names 127.0.0.1."""
    upstream = RecordingUpstream()
    port = reactor.listenSSL(0, Site(upstream), _server_options(ca, "127.0.0.1"), interface="127.0.0.1")
    upstream.url = f"https://127.0.0.1:{port.getHost().port}"
    yield upstream
    await port.stopListening()


def _write(tmp_path, name: str, blob) -> str:
    path = tmp_path / name
    blob.write_to_path(str(path))
    return str(path)


async def _products(gateway):
    response = await gateway.get("/api/data/products")
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_https_upstream_verified_with_internal_ca(make_gateway, https_upstream, ca, tmp_path):
    """An upstream certified by UPSTREAM_CA_FILE's CA for its hostname is reached."""
    gateway = await make_gateway(
        STORAGE_SERVICE_URL=https_upstream.url, UPSTREAM_CA_FILE=_write(tmp_path, "ca.pem", ca.cert_pem)
    )
    code, _ = await _products(gateway)
    assert code == 200
    assert https_upstream.seen[-1].uri == b"/products"


@pytest.mark.parametrize("case", ["unknown-ca", "wrong-hostname"])
@pytest_twisted.ensureDeferred
async def test_unverifiable_upstream_is_503_and_logged(make_gateway, ca, tmp_path, case):
    """An unknown CA or a certificate for another name is a 503, logged with the reason."""
    identity = "127.0.0.1" if case == "unknown-ca" else "other.example"
    trusted = trustme.CA() if case == "unknown-ca" else ca
    upstream = RecordingUpstream()
    port = reactor.listenSSL(0, Site(upstream), _server_options(ca, identity), interface="127.0.0.1")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        gateway = await make_gateway(
            STORAGE_SERVICE_URL=f"https://127.0.0.1:{port.getHost().port}",
            UPSTREAM_CA_FILE=_write(tmp_path, "ca.pem", trusted.cert_pem),
        )
        code, body = await _products(gateway)
        await wait_until(lambda: any("outgoing_response" in str(e.get("message")) for e in events))
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
    assert code == 503 and json.loads(body)["error"] == "Storage service unavailable"
    assert upstream.seen == []
    access = [json.loads(str(e["message"][0])) for e in events if "outgoing_response" in str(e.get("message"))]
    assert access[-1]["upstream_failure"] == "tls"
    assert access[-1]["outcome"] == "upstream_tls"


@pytest_twisted.ensureDeferred
async def test_verification_off_only_with_warning(make_gateway, ca):
    """UPSTREAM_TLS_VERIFY=0 reaches an unverifiable upstream, and says so at start."""
    upstream = RecordingUpstream()
    port = reactor.listenSSL(0, Site(upstream), _server_options(trustme.CA(), "elsewhere"), interface="127.0.0.1")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        gateway = await make_gateway(
            STORAGE_SERVICE_URL=f"https://127.0.0.1:{port.getHost().port}", UPSTREAM_TLS_VERIFY="0"
        )
        code, _ = await _products(gateway)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
    assert code == 200
    assert any("upstream_tls_verification_disabled" in str(e.get("message")) for e in events)


@pytest.mark.parametrize("with_client_cert", [True, False])
@pytest_twisted.ensureDeferred
async def test_mutual_tls_client_certificate(make_gateway, ca, tmp_path, with_client_cert):
    """An upstream that requires a client certificate accepts the configured one, refuses none."""
    client_ca = trustme.CA()
    upstream = RecordingUpstream()
    port = reactor.listenSSL(
        0, Site(upstream), _server_options(ca, "127.0.0.1", client_ca=client_ca), interface="127.0.0.1"
    )
    env = {
        "STORAGE_SERVICE_URL": f"https://127.0.0.1:{port.getHost().port}",
        "UPSTREAM_CA_FILE": _write(tmp_path, "ca.pem", ca.cert_pem),
    }
    if with_client_cert:
        client = client_ca.issue_cert("gateway.deltastream.internal")
        env["UPSTREAM_CLIENT_CERT"] = _write(tmp_path, "client.pem", client.cert_chain_pems[0])
        env["UPSTREAM_CLIENT_KEY"] = _write(tmp_path, "client.key", client.private_key_pem)
    try:
        gateway = await make_gateway(**env)
        code, _ = await _products(gateway)
    finally:
        await port.stopListening()
    assert code == (200 if with_client_cert else 503)


@pytest_twisted.async_yield_fixture
async def https_gateway(ca, tmp_path, upstream):
    """A gateway terminating TLS on PORT=ssl:..., and a client that trusts it."""
    cert = ca.issue_cert("127.0.0.1")
    key = _write(tmp_path, "gw.key", cert.private_key_pem)
    chain = _write(tmp_path, "gw.pem", cert.cert_chain_pems[0])
    gateway = RunningGateway(
        {
            "PORT": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={chain}",
            "STORAGE_SERVICE_URL": upstream.url,
        }
    )
    await gateway.start()
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.cert_pem.bytes())])
    client = treq.client.HTTPClient(Agent(reactor, BrowserLikePolicyForHTTPS(trust)))
    gateway.https = f"https://127.0.0.1:{gateway.port_number}"
    gateway.https_client = client
    yield gateway
    await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_tls_termination_forwards_https_proto(https_gateway, upstream):
    """PORT=ssl:... serves HTTPS; the upstream is told the client came over https."""
    response = await https_gateway.https_client.get(https_gateway.https + "/api/data/products")
    await response.content()
    assert response.code == 200
    assert upstream.seen[-1].header(b"x-forwarded-proto") == [b"https"]
    assert b"proto=https" in upstream.seen[-1].header(b"forwarded")[0]


@pytest_twisted.ensureDeferred
async def test_tls_termination_refuses_old_protocols(https_gateway):
    """A client limited to TLS 1.1 cannot complete a handshake with the gateway."""
    from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class TLS11Only(ssl.ClientContextFactory):
        def getContext(self):
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_min_proto_version(SSL.TLS1_VERSION)
            context.set_max_proto_version(SSL.TLS1_1_VERSION)
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
            return context

    lost = []

    class Probe(Protocol):
        def connectionMade(self):
            self.transport.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")

        def dataReceived(self, data):
            lost.append(("data", data))

        def connectionLost(self, reason):
            lost.append(("lost", reason))

    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", https_gateway.port_number, TLS11Only())
    await connectProtocol(endpoint, Probe())
    await wait_until(lambda: any(kind == "lost" for kind, _ in lost))
    assert not any(kind == "data" for kind, _ in lost)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40],
                         ids=["nothing", "half-a-client-hello"])
@pytest_twisted.ensureDeferred
async def test_a_handshake_never_finished_is_closed_after_client_timeout(ca, tmp_path, upstream, sent):
    """A client that opens a TLS port and never completes its handshake holds the
    connection no longer than CLIENT_TIMEOUT."""
    from twisted.internet.protocol import ClientFactory, Protocol

    cert = ca.issue_cert("127.0.0.1")
    key = _write(tmp_path, "gw.key", cert.private_key_pem)
    chain = _write(tmp_path, "gw.pem", cert.cert_chain_pems[0])
    gateway = RunningGateway({
        "PORT": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={chain}",
        "STORAGE_SERVICE_URL": upstream.url, "CLIENT_TIMEOUT": "0.5",
    })
    await gateway.start()
    closed = []

    class Stalled(Protocol):
        def connectionMade(self):
            self.transport.write(sent)

        def connectionLost(self, reason):
            closed.append(reason)

    try:
        reactor.connectTCP("127.0.0.1", gateway.port_number, ClientFactory.forProtocol(Stalled))
        await wait_until(lambda: closed, timeout=10)
    finally:
        await gateway.stop()
    assert len(closed) == 1
