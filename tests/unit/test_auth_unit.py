"""Unit tests for deltagw.policy.token_verifiers: bearer parsing, verifiers and their cache."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import cast

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from deltagw.policy.token_verifiers import (
    MAX_ANSWER_BYTES,
    MAX_TOKEN_LENGTH,
    AuthError,
    AuthUnavailable,
    CachingVerifier,
    Identity,
    InvalidToken,
    LocalVerifier,
    MissingCredentials,
    RemoteVerifier,
    parse_bearer,
)

NOW = 1_700_000_000.0
SECRET = b"s" * 32
ALICE = Identity(user_id="42", email="alice@example.com")
_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- parse_bearer -----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer abc", b"abc"),
        (b"BEARER eyJ.eyJ.sig", b"eyJ.eyJ.sig"),
        (b"Bearer a-b.c_d~e+f/g==", b"a-b.c_d~e+f/g=="),
        (b"Bearer   abc", b"abc"),
        (b" Bearer abc\t", b"abc"),
        (b"Bearer " + b"a" * MAX_TOKEN_LENGTH, b"a" * MAX_TOKEN_LENGTH),
    ],
)
def test_parse_bearer_extracts_well_formed_token(header: bytes, token: bytes) -> None:
    """A single RFC 6750 token after a case-insensitive Bearer scheme is returned."""
    assert parse_bearer(header) == token


@pytest.mark.parametrize("header", [None, b"", b"  \t "])
def test_parse_bearer_reports_missing_credentials(header: bytes | None) -> None:
    """An absent or blank header is missing credentials, not an invalid token."""
    with pytest.raises(MissingCredentials):
        parse_bearer(header)


@pytest.mark.parametrize(
    "header",
    [
        b"Bearer",
        b"Bearer ",
        b"Bearer abc def",
        b"Basic dXNlcjpwYXNz",
        b"Token abc",
        b"Bearerabc",
        b"Bearer\tabc",
        b"Bearer a=b",
        b"Bearer =abc",
        b"Bearer abc,",
        b"Bearer ab\x00c",
        b"Bearer ab\r\nX-User-ID: 1",
        b"Bearer caf\xc3\xa9",
        b"Bearer " + b"a" * (MAX_TOKEN_LENGTH + 1),
    ],
)
def test_parse_bearer_rejects_malformed_credentials(header: bytes) -> None:
    """Anything but exactly one well-formed bearer token is an invalid token."""
    with pytest.raises(InvalidToken):
        parse_bearer(header)


def test_unavailability_is_not_a_client_auth_error() -> None:
    """`except AuthError` (401) catches bad credentials but never an auth outage."""
    assert issubclass(MissingCredentials, AuthError)
    assert issubclass(InvalidToken, AuthError)
    assert not issubclass(AuthUnavailable, AuthError)


def test_identity_refuses_header_injection() -> None:
    """An identity cannot carry control characters into upstream headers."""
    with pytest.raises(ValueError):
        Identity(user_id="1\r\nX-Admin: yes", email="")
    with pytest.raises(ValueError):
        Identity(user_id="", email="a@example.com")


# --- CachingVerifier --------------------------------------------------------


class _ControlledVerifier:
    """An inner verifier whose answers the test fires by hand."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Identity]] = []
        self.cancelled: list[Deferred[Identity]] = []

    def verify(self, token: bytes) -> Deferred[Identity]:
        d: Deferred[Identity] = Deferred(self.cancelled.append)
        self.calls.append(d)
        return d


def _jwt_expiring_at(exp: float) -> bytes:
    return jwt.encode({"sub": "42", "exp": exp}, SECRET, algorithm="HS256").encode()


class CachingVerifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = _clock()
        self.inner = _ControlledVerifier()
        self.cache = CachingVerifier(self.inner, self.clock, ttl=10)

    def _verify_and_answer(self, token: bytes, identity: Identity = ALICE) -> None:
        d = self.cache.verify(token)
        self.inner.calls[-1].callback(identity)
        self.assertEqual(self.successResultOf(d), identity)

    def test_identity_reused_until_ttl(self) -> None:
        """A verified token is not re-verified until ttl seconds have passed."""
        self._verify_and_answer(b"opaque-token")
        self.clock.advance(9.9)
        self.assertEqual(
            self.successResultOf(self.cache.verify(b"opaque-token")), ALICE
        )
        self.assertEqual(len(self.inner.calls), 1)
        self.clock.advance(0.1)
        self.assertNoResult(self.cache.verify(b"opaque-token"))
        self.assertEqual(len(self.inner.calls), 2)

    def test_identity_never_cached_past_token_exp(self) -> None:
        """A JWT expiring before the ttl is re-verified from its exp on."""
        token = _jwt_expiring_at(NOW + 3)
        self._verify_and_answer(token)
        self.clock.advance(2.9)
        self.successResultOf(self.cache.verify(token))
        self.clock.advance(0.1)
        self.assertNoResult(self.cache.verify(token))
        self.assertEqual(len(self.inner.calls), 2)

    def test_token_already_past_exp_not_cached(self) -> None:
        """An identity accepted within leeway after exp is not stored at all."""
        token = _jwt_expiring_at(NOW - 5)
        self._verify_and_answer(token)
        self.assertNoResult(self.cache.verify(token))
        self.assertEqual(len(self.inner.calls), 2)

    def test_undecodable_jwt_lookalike_cached_for_ttl(self) -> None:
        """A token that only looks like a JWT is cached for the plain ttl."""
        token = b"not.a!!.jwt"
        self._verify_and_answer(token)
        self.clock.advance(9.9)
        self.successResultOf(self.cache.verify(token))
        self.assertEqual(len(self.inner.calls), 1)

    def test_entries_keyed_by_digest(self) -> None:
        """The cache holds the token's SHA-256 digest, never the token itself."""
        self._verify_and_answer(b"secret-token")
        self.assertEqual(
            list(self.cache._entries), [hashlib.sha256(b"secret-token").digest()]
        )

    def test_least_recently_used_entry_evicted(self) -> None:
        """Past max_entries, the entry unused for longest is dropped first."""
        self.cache = CachingVerifier(self.inner, self.clock, ttl=10, max_entries=2)
        self._verify_and_answer(b"a")
        self._verify_and_answer(b"b")
        self.successResultOf(self.cache.verify(b"a"))
        self._verify_and_answer(b"c")
        self.assertEqual(len(self.inner.calls), 3)
        self.successResultOf(self.cache.verify(b"a"))
        self.successResultOf(self.cache.verify(b"c"))
        self.assertEqual(len(self.inner.calls), 3)
        self.assertNoResult(self.cache.verify(b"b"))
        self.assertEqual(len(self.inner.calls), 4)

    def test_rejection_reused_for_negative_ttl(self) -> None:
        """A rejected token is answered from memory for one second, then re-verified."""
        d = self.cache.verify(b"bad")
        self.inner.calls[0].errback(InvalidToken("rejected"))
        self.failureResultOf(d, InvalidToken)
        self.clock.advance(0.9)
        self.failureResultOf(self.cache.verify(b"bad"), InvalidToken)
        self.assertEqual(len(self.inner.calls), 1)
        self.clock.advance(0.1)
        self.assertNoResult(self.cache.verify(b"bad"))
        self.assertEqual(len(self.inner.calls), 2)

    def test_unavailability_never_cached(self) -> None:
        """After an auth outage the very next request asks the auth service again."""
        d = self.cache.verify(b"tok")
        self.inner.calls[0].errback(AuthUnavailable("refused"))
        self.failureResultOf(d, AuthUnavailable)
        self.assertNoResult(self.cache.verify(b"tok"))
        self.assertEqual(len(self.inner.calls), 2)

    def test_zero_ttl_verifies_every_request(self) -> None:
        """With ttl 0 every call, concurrent or not, reaches the inner verifier."""
        self.cache = CachingVerifier(self.inner, self.clock, ttl=0)
        first = self.cache.verify(b"tok")
        second = self.cache.verify(b"tok")
        self.inner.calls[0].callback(ALICE)
        self.inner.calls[1].errback(InvalidToken("revoked"))
        self.successResultOf(first)
        self.failureResultOf(second, InvalidToken)
        self.assertNoResult(self.cache.verify(b"tok"))
        self.assertEqual(len(self.inner.calls), 3)

    def test_concurrent_calls_share_one_inner_call(self) -> None:
        """500 simultaneous verifications of one token cost one inner call."""
        waiting = [self.cache.verify(b"tok") for _ in range(500)]
        self.assertEqual(len(self.inner.calls), 1)
        self.inner.calls[0].callback(ALICE)
        for d in waiting:
            self.assertEqual(self.successResultOf(d), ALICE)

    def test_shared_rejection_reaches_every_caller(self) -> None:
        """Every caller waiting on a shared call receives its failure."""
        waiting = [self.cache.verify(b"tok") for _ in range(3)]
        self.inner.calls[0].errback(AuthUnavailable("timeout"))
        for d in waiting:
            self.failureResultOf(d, AuthUnavailable)

    def test_cancelling_one_caller_spares_the_others(self) -> None:
        """A caller that goes away does not cancel the call others wait on."""
        leaving, staying = self.cache.verify(b"tok"), self.cache.verify(b"tok")
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.assertEqual(self.inner.cancelled, [])
        self.inner.calls[0].callback(ALICE)
        self.assertEqual(self.successResultOf(staying), ALICE)

    def test_cancelling_every_caller_cancels_inner_call(self) -> None:
        """Once nobody waits, the inner call is cancelled; a new one starts afresh."""
        callers = [self.cache.verify(b"tok") for _ in range(2)]
        for d in callers:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(self.inner.cancelled, self.inner.calls)
        later = self.cache.verify(b"tok")
        self.assertEqual(len(self.inner.calls), 2)
        self.inner.calls[1].callback(ALICE)
        self.assertEqual(self.successResultOf(later), ALICE)

    def test_synchronous_inner_verifier_answers(self) -> None:
        """An inner verifier that answers at once (LocalVerifier) is cached too."""
        local = LocalVerifier.from_secret(SECRET, reactor=self.clock)
        cache = CachingVerifier(local, self.clock)
        token = jwt.encode(
            {"sub": "42", "email": "alice@example.com", "exp": NOW + 60},
            SECRET,
            algorithm="HS256",
        ).encode()
        self.assertEqual(self.successResultOf(cache.verify(token)), ALICE)
        self.assertEqual(self.successResultOf(cache.verify(token)), ALICE)


# --- RemoteVerifier ---------------------------------------------------------


class _AuthService(Resource):
    """A stand-in auth service that answers every /verify with one response."""

    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.received: list[tuple[bytes, bytes, object]] = []

    def render(self, request: Request) -> bytes:
        self.received.append(
            (request.method, request.path, json.loads(request.content.read()))
        )
        request.setResponseCode(self.code)
        if self.code == 302:
            request.setHeader(b"Location", b"http://elsewhere/verify")
        return self.body


class _SilentAuthService(Resource):
    """A stand-in auth service that stops answering after ``partial_body``.

    With ``partial_body`` None it never even sends the response headers.
    """

    isLeaf = True

    def __init__(self, partial_body: bytes | None = None) -> None:
        super().__init__()
        self.partial_body = partial_body
        self.finished: list[Deferred[None]] = []

    def render(self, request: Request) -> object:
        self.finished.append(request.notifyFinish())
        if self.partial_body is not None:
            request.write(self.partial_body)
        return NOT_DONE_YET


class _ChunkedAuthService(Resource):
    """A stand-in auth service that sends its 200 answer in several chunks."""

    isLeaf = True

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__()
        self.chunks = chunks

    def render(self, request: Request) -> object:
        for chunk in self.chunks:
            request.write(chunk)
        request.finish()
        return NOT_DONE_YET


class _RefusingAgent:
    """An IAgent whose every connection attempt is refused."""

    def request(self, *args: object, **kwargs: object) -> Deferred[object]:
        return defer.fail(error.ConnectionRefusedError())


def _answer(body: object) -> bytes:
    return json.dumps(body).encode()


class RemoteVerifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = _clock()

    def _verifier(self, resource: Resource) -> tuple[RemoteVerifier, StubTreq]:
        stub = StubTreq(resource)
        verifier = RemoteVerifier(
            cast(HTTPClient, stub), "http://auth:8001/", 5, self.clock
        )
        return verifier, stub

    def _unavailable_reason(self, code: int, body: bytes) -> str:
        verifier, _ = self._verifier(_AuthService(code, body))
        failure = self.failureResultOf(verifier.verify(b"tok"), AuthUnavailable)
        return cast(AuthUnavailable, failure.value).reason

    def test_valid_answer_becomes_identity(self) -> None:
        """A 200 valid answer yields the identity, a numeric user id as a string."""
        service = _AuthService(
            200, _answer({"valid": True, "user_id": 42, "email": "alice@example.com"})
        )
        verifier, _ = self._verifier(service)
        self.assertEqual(self.successResultOf(verifier.verify(b"tok")), ALICE)
        self.assertEqual(service.received, [(b"POST", b"/verify", {"token": "tok"})])

    def test_rejection_statuses_are_invalid_token(self) -> None:
        """401 and 403 from the auth service mean the token is not acceptable."""
        for code in (401, 403):
            verifier, _ = self._verifier(_AuthService(code, b'{"detail": "nope"}'))
            self.failureResultOf(verifier.verify(b"tok"), InvalidToken)

    def test_explicit_invalid_answer_is_invalid_token(self) -> None:
        """A 200 answer saying valid: false is a rejection, not an outage."""
        verifier, _ = self._verifier(_AuthService(200, _answer({"valid": False})))
        self.failureResultOf(verifier.verify(b"tok"), InvalidToken)

    def test_other_statuses_are_unavailable(self) -> None:
        """Server errors and unfollowed redirects mean auth is unavailable."""
        self.assertEqual(self._unavailable_reason(500, b"oops"), "status 500")
        self.assertEqual(self._unavailable_reason(502, b""), "status 502")
        self.assertEqual(self._unavailable_reason(302, b""), "status 302")

    def test_garbage_answers_are_unavailable(self) -> None:
        """A 200 whose body is not the expected JSON is a bad response."""
        for body in [
            b"<html>",
            b"\xff\xfe",
            _answer(["valid"]),
            _answer({"user_id": 42, "email": "a@example.com"}),
            _answer({"valid": "yes", "user_id": 42, "email": "a@example.com"}),
            _answer({"valid": True, "email": "a@example.com"}),
            _answer({"valid": True, "user_id": True, "email": "a@example.com"}),
            _answer({"valid": True, "user_id": 42}),
            _answer({"valid": True, "user_id": "4\r\n2", "email": "a@example.com"}),
        ]:
            self.assertEqual(self._unavailable_reason(200, body), "bad response", body)

    def test_timeout_cancels_request(self) -> None:
        """A silent auth service times out and its connection is closed."""
        service = _SilentAuthService()
        verifier, stub = self._verifier(service)
        d = verifier.verify(b"tok")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, AuthUnavailable)
        self.assertEqual(cast(AuthUnavailable, failure.value).reason, "timeout")
        stub.flush()
        self.failureResultOf(service.finished[0], error.ConnectionClosed)

    def test_stalled_body_times_out_and_closes(self) -> None:
        """A stalled body hits the same timeout and its connection is closed."""
        service = _SilentAuthService(partial_body=b'{"valid": tr')
        verifier, stub = self._verifier(service)
        d = verifier.verify(b"tok")
        stub.flush()
        self.assertNoResult(d)
        self.clock.advance(5)
        failure = self.failureResultOf(d, AuthUnavailable)
        self.assertEqual(cast(AuthUnavailable, failure.value).reason, "timeout")
        stub.flush()
        self.failureResultOf(service.finished[0], error.ConnectionClosed)

    def test_oversized_answer_is_unavailable(self) -> None:
        """An answer larger than any real verify answer is cut off as a bad response."""
        service = _ChunkedAuthService([b"x" * MAX_ANSWER_BYTES, b"x", b"x"])
        verifier, _ = self._verifier(service)
        failure = self.failureResultOf(verifier.verify(b"tok"), AuthUnavailable)
        self.assertEqual(cast(AuthUnavailable, failure.value).reason, "bad response")

    def test_cancel_aborts_request(self) -> None:
        """A caller's cancellation closes the connection and is no outage."""
        service = _SilentAuthService()
        verifier, stub = self._verifier(service)
        d = verifier.verify(b"tok")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        stub.flush()
        self.failureResultOf(service.finished[0], error.ConnectionClosed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refused_connection_is_unavailable(self) -> None:
        """A refused connection is reported as an outage with reason refused."""
        verifier = RemoteVerifier(
            HTTPClient(_RefusingAgent()), "http://auth:8001", 5, self.clock
        )
        failure = self.failureResultOf(verifier.verify(b"tok"), AuthUnavailable)
        self.assertEqual(cast(AuthUnavailable, failure.value).reason, "refused")
        self.assertEqual(self.clock.getDelayedCalls(), [])


# --- LocalVerifier ----------------------------------------------------------


class LocalVerifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = _clock()
        self.verifier = LocalVerifier.from_secret(SECRET, reactor=self.clock)

    def _key_file(self, pem: bytes) -> str:
        fd, path = tempfile.mkstemp(suffix=".pem")
        self.addCleanup(os.remove, path)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return path

    def _hs256(self, claims: dict[str, object], key: bytes = SECRET) -> bytes:
        return jwt.encode(claims, key, algorithm="HS256").encode()

    def test_hs256_token_verified(self) -> None:
        """A correctly signed, unexpired HS256 token yields its sub and email."""
        token = self._hs256(
            {"sub": "42", "email": "alice@example.com", "exp": NOW + 60}
        )
        self.assertEqual(self.successResultOf(self.verifier.verify(token)), ALICE)

    def test_missing_email_is_empty(self) -> None:
        """The email claim is optional and defaults to the empty string."""
        token = self._hs256({"sub": "42", "exp": NOW + 60})
        self.assertEqual(
            self.successResultOf(self.verifier.verify(token)), Identity("42", "")
        )

    def test_expiry_follows_reactor_clock_with_leeway(self) -> None:
        """A token is accepted until exp plus the 30 s leeway on the reactor's clock."""
        token = self._hs256({"sub": "42", "exp": NOW + 10})
        self.clock.advance(39.9)
        self.successResultOf(self.verifier.verify(token))
        self.clock.advance(0.1)
        self.failureResultOf(self.verifier.verify(token), InvalidToken)

    def test_not_yet_valid_token_rejected(self) -> None:
        """A token whose nbf lies beyond the leeway is rejected."""
        token = self._hs256({"sub": "42", "exp": NOW + 600, "nbf": NOW + 31})
        self.failureResultOf(self.verifier.verify(token), InvalidToken)

    def test_bad_signature_rejected(self) -> None:
        """A token signed with another secret is rejected."""
        token = self._hs256({"sub": "42", "exp": NOW + 60}, key=b"x" * 32)
        self.failureResultOf(self.verifier.verify(token), InvalidToken)

    def test_required_claims_enforced(self) -> None:
        """A token without sub or without exp is rejected."""
        for claims in ({"exp": NOW + 60}, {"sub": "42"}, {"sub": "42", "exp": "soon"}):
            token = self._hs256(claims)
            self.failureResultOf(self.verifier.verify(token), InvalidToken)

    def test_alg_none_rejected(self) -> None:
        """An unsigned token is rejected, and `none` cannot be configured."""
        token = jwt.encode({"sub": "42", "exp": NOW + 60}, None, algorithm="none")
        self.failureResultOf(self.verifier.verify(token.encode()), InvalidToken)
        with self.assertRaises(ValueError):
            LocalVerifier(SECRET, ["none"], reactor=self.clock)

    def test_rs256_token_verified_with_public_key_file(self) -> None:
        """An RSA public key file yields an RS256 verifier that accepts its tokens."""
        verifier = LocalVerifier.from_public_key_file(
            self._key_file(_public_pem(_RSA_KEY)), reactor=self.clock
        )
        token = jwt.encode({"sub": "7", "exp": NOW + 60}, _RSA_KEY, algorithm="RS256")
        self.assertEqual(
            self.successResultOf(verifier.verify(token.encode())), Identity("7", "")
        )

    def test_es256_token_verified_with_public_key_file(self) -> None:
        """A P-256 public key file yields an ES256 verifier that accepts its tokens."""
        verifier = LocalVerifier.from_public_key_file(
            self._key_file(_public_pem(_EC_KEY)), reactor=self.clock
        )
        token = jwt.encode({"sub": "7", "exp": NOW + 60}, _EC_KEY, algorithm="ES256")
        self.assertEqual(
            self.successResultOf(verifier.verify(token.encode())), Identity("7", "")
        )

    def test_hmac_signed_with_public_key_rejected(self) -> None:
        """An HS256 token forged with the RSA public key as secret is rejected."""
        pem = _public_pem(_RSA_KEY)
        verifier = LocalVerifier.from_public_key_file(
            self._key_file(pem), reactor=self.clock
        )
        header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
        payload = jwt.utils.base64url_encode(
            json.dumps({"sub": "0", "exp": NOW + 60}).encode()
        )
        signature = jwt.utils.base64url_encode(
            jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).sign(
                header + b"." + payload, pem
            )
        )
        forged = header + b"." + payload + b"." + signature
        self.failureResultOf(verifier.verify(forged), InvalidToken)

    def test_unsafe_key_configurations_refused(self) -> None:
        """A public key as HMAC secret, or HMAC mixed with RSA, stops start-up."""
        pem = _public_pem(_RSA_KEY)
        with self.assertRaises(ValueError):
            LocalVerifier(pem, ["HS256"], reactor=self.clock)
        with self.assertRaises(ValueError):
            LocalVerifier(pem, ["RS256", "HS256"], reactor=self.clock)
        with self.assertRaises(ValueError):
            LocalVerifier(SECRET, ["RS256"], reactor=self.clock)
