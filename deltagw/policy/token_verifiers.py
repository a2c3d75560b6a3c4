"""Who is calling: bearer credentials, token verification and its cache.

The gateway turns an ``Authorization`` header into an `Identity` in three
steps, each replaceable on its own:

1. `parse_bearer` checks the header's shape (RFC 6750 §2.1) so that garbage
   never costs an upstream call.
2. A verifier decides whether the token is genuine: `RemoteVerifier` asks the
   auth service, `LocalVerifier` checks a JWT signature in-process.
3. `CachingVerifier` sits in front of either, so that a burst of requests
   carrying one token costs the auth service one call, not one per request.

The outcome is one of three things, and the gateway answers each differently:
an `Identity`; an `AuthError` (401: the client must fix its
credentials); or `AuthUnavailable` (503 with Retry-After: the client should
retry, not log in again). That is why `AuthUnavailable` deliberately does
*not* derive from `AuthError`: ``except AuthError`` can never turn an auth
outage into a 401.

Tokens are secrets: nothing here logs them, puts them in exception messages,
or keeps them in memory longer than a verification takes (the cache is keyed
by their SHA-256 digest).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm, get_default_algorithms
from jwt.utils import base64url_decode
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from deltagw.upstream.body import BodyInterrupted, read_body
from deltagw.upstream.failures import failure_reason, was_cancelled

MAX_ANSWER_BYTES = 64 * 1024
"""Largest /verify answer read; a real one is a few hundred bytes."""

MAX_TOKEN_LENGTH = 4096
"""Longest bearer token accepted; real JWTs are far shorter, and the bound
keeps a hostile header from costing hashing, caching or an upstream call."""

# RFC 6750 §2.1:
#   b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_TOKEN68 = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")

# Identity fields end up in upstream headers (X-User-ID, X-User-Email); a
# control character there would be a header-injection vector.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


class AuthError(Exception):
    """The client's credentials are missing or not acceptable (a 401)."""


class MissingCredentials(AuthError):
    """The request carries no credentials at all."""


class InvalidToken(AuthError):
    """The credentials are malformed, or the token was verified and rejected."""


class AuthUnavailable(Exception):
    """The token could not be verified because the auth service failed (a 503).

    Not an `AuthError`: the token may well be valid, so the client must be
    told to retry rather than to log in again.

    Attributes:
        reason: Short, log-friendly cause: ``"timeout"``, ``"refused"``,
            ``"unreachable"``, ``"connection failed"``, ``"status 502"`` or
            ``"bad response"``. Never contains the token.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"auth service unavailable: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """A verified caller, as forwarded upstream in X-User-ID / X-User-Email.

    Attributes:
        user_id: The auth service's user id (a JWT's ``sub``), never empty.
        email: The user's e-mail address, ``""`` when the token carries none.

    Raises:
        ValueError: If ``user_id`` is empty or either field contains a
            control character, since both become HTTP header values.
    """

    user_id: str
    email: str

    def __post_init__(self) -> None:
        if not self.user_id:
            raise ValueError("empty user id")
        if _CONTROL_CHARACTER.search(self.user_id) or _CONTROL_CHARACTER.search(
            self.email
        ):
            raise ValueError("control character in identity")


class Verifier(Protocol):
    """Anything that can turn a bearer token into an `Identity`."""

    def verify(self, token: bytes) -> Deferred[Identity]:
        """Verify ``token``.

        Returns:
            A Deferred firing with the `Identity`, or failing with
            `InvalidToken` or `AuthUnavailable`.
        """


def parse_bearer(header: bytes | None) -> bytes:
    """Extract the token from an ``Authorization: Bearer <token>`` header.

    The check is strict (RFC 6750 §2.1, scheme case-insensitive per RFC 9110
    §11.1) so that anything that cannot be a token is refused before it costs
    a verification.

    Args:
        header: The raw header value, or None when the request has none.

    Returns:
        The token, exactly as sent.

    Raises:
        MissingCredentials: If the header is absent or blank.
        InvalidToken: If it is not a single well-formed bearer token of at
            most `MAX_TOKEN_LENGTH` characters.
    """
    value = (header or b"").strip(b" \t")
    if not value:
        raise MissingCredentials("no Authorization header")
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        raise InvalidToken("not a Bearer credential")
    # RFC 6750 allows 1*SP between the scheme and the token.
    token = token.lstrip(b" ")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token too long")
    if not _TOKEN68.fullmatch(token):
        raise InvalidToken("malformed bearer token")
    return token


class RemoteVerifier:
    """Verifies tokens by asking the auth service (``POST /verify``).

    The auth service is the authority, so its answer is mapped faithfully:
    a rejection (401/403) is the client's problem, anything else that is not
    a clean yes is the auth service's problem and must not be reported to the
    client as a bad token.
    """

    def __init__(
        self,
        http_client: HTTPClient,
        auth_url: str,
        timeout: float,
        reactor: IReactorTime,
    ) -> None:
        """Create the verifier.

        Args:
            http_client: Pooled client used for the calls.
            auth_url: Base URL of the auth service (``http://auth:8001``).
            timeout: Seconds the whole call, body included, may take.
            reactor: Provides the clock for the timeout.
        """
        self._http_client = http_client
        self._verify_url = auth_url.rstrip("/") + "/verify"
        self._timeout = timeout
        self._reactor = reactor

    def verify(self, token: bytes) -> Deferred[Identity]:
        """Ask the auth service whether ``token`` is valid.

        Cancelling the returned Deferred (or its timing out) cancels the
        request, which closes its connection.

        Args:
            token: A bearer token as returned by `parse_bearer`.

        Returns:
            A Deferred firing with the `Identity`, or failing with
            `InvalidToken` (401/403, or an explicit ``"valid": false``) or
            `AuthUnavailable` (timeout, connection failure, any other status,
            or an answer that is not the expected JSON).
        """
        d = defer.ensureDeferred(self._ask(token))
        # treq's own timeout= stops at the response headers; this one also
        # covers reading the body.
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_timed_out)
        d.addErrback(_transport_failure)
        return d

    async def _ask(self, token: bytes) -> Identity:
        response = await self._http_client.post(
            self._verify_url,
            json={"token": token.decode("ascii")},
            allow_redirects=False,
        )
        # Read the body whatever the status, so the connection goes back to
        # the pool instead of being held by an unread response.
        try:
            body = await read_body(response, self._reactor, self._timeout, MAX_ANSWER_BYTES)
        except BodyInterrupted as e:
            raise AuthUnavailable(_BODY_FAILURES[e.reason]) from None
        if response.code in (401, 403):
            raise InvalidToken(f"rejected by auth service ({response.code})")
        if response.code != 200:
            raise AuthUnavailable(f"status {response.code}")
        return _identity_from_answer(body)


_BODY_FAILURES = {"too_large": "bad response", "reset": "connection failed", "timeout": "timeout"}
"""`AuthUnavailable` reasons for the ways reading the answer can fail."""


def _identity_from_answer(body: bytes) -> Identity:
    """Read the auth service's 200 answer, trusting nothing about its shape."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        raise AuthUnavailable("bad response") from None
    if not isinstance(answer, dict):
        raise AuthUnavailable("bad response")
    if answer.get("valid") is False:
        raise InvalidToken("rejected by auth service")
    user_id = answer.get("user_id")
    email = answer.get("email")
    if (
        answer.get("valid") is not True
        # bool is an int subclass; `true` is not a user id.
        or isinstance(user_id, bool)
        or not isinstance(user_id, (str, int))
        or not isinstance(email, str)
    ):
        raise AuthUnavailable("bad response")
    try:
        return Identity(user_id=str(user_id), email=email)
    except ValueError:
        raise AuthUnavailable("bad response") from None


def _timed_out(result: Any, timeout: float) -> NoReturn:
    """Replace whatever the cancelled call ended with by one timeout error."""
    raise AuthUnavailable("timeout")


def _transport_failure(failure: Failure) -> Failure:
    """Turn a network failure into `AuthUnavailable`; let anything else through.

    A cancellation by the caller stays a plain `CancelledError` (it is not an
    outage), and only known transport errors are translated: a bug in the
    gateway must still surface as a bug (500), not pass for an auth outage.
    """
    if was_cancelled(failure):
        raise CancelledError()
    reason = failure_reason(failure)
    if reason in ("refused", "unreachable"):
        raise AuthUnavailable(reason)
    if reason in ("reset", "invalid_response", "tls"):
        raise AuthUnavailable("connection failed")
    return failure


_CURVE_ALGORITHMS: dict[str, str] = {
    ec.SECP256R1.name: "ES256",
    ec.SECP384R1.name: "ES384",
    ec.SECP521R1.name: "ES512",
}


class LocalVerifier:
    """Verifies JWTs in-process, without a round trip to the auth service.

    PyJWT checks the signature and the required claims; the time claims
    (``exp``, ``nbf``) are checked here against ``reactor.seconds()``, because
    PyJWT reads the wall clock itself and offers no way to inject one — this
    way tests drive expiry with a `task.Clock`. ``iat`` is informational
    (RFC 7519 §4.1.6) and not checked.
    """

    def __init__(
        self,
        key: str | bytes,
        algorithms: Sequence[str],
        leeway: float = 30,
        *,
        reactor: IReactorTime,
    ) -> None:
        """Create the verifier, refusing unsafe configurations up front.

        Args:
            key: HMAC secret, or PEM-encoded public key.
            algorithms: Accepted ``alg`` values, fixed by configuration and
                never taken from the token (RFC 8725 §2.1).
            leeway: Seconds of clock skew tolerated on ``exp`` and ``nbf``.
            reactor: Source of "now".

        Raises:
            ValueError: If ``algorithms`` is empty, contains ``none`` or an
                unknown name, mixes HMAC with public-key algorithms, or
                ``key`` does not suit them (e.g. a public key as an HMAC
                secret).
        """
        if not algorithms:
            raise ValueError("no JWT algorithms configured")
        known = get_default_algorithms()
        implementations = []
        for name in algorithms:
            if name.lower() == "none" or name not in known:
                raise ValueError(f"unacceptable JWT algorithm: {name!r}")
            implementations.append(known[name])
        # RFC 8725 §3.1: never mix HMAC with public-key algorithms, or a
        # public key could be used as an HMAC secret to forge tokens.
        if len({isinstance(i, HMACAlgorithm) for i in implementations}) > 1:
            raise ValueError("HMAC and public-key JWT algorithms must not be mixed")
        try:
            # Parse the key once now (a bad key stops start-up), and hand
            # PyJWT the parsed object rather than re-parsing PEM per request.
            prepared = [i.prepare_key(key) for i in implementations]
        except (jwt.InvalidKeyError, ValueError, TypeError) as e:
            raise ValueError(
                f"JWT key unsuitable for {list(algorithms)}: {e}"
            ) from None
        self._key = prepared[0]
        self._algorithms = list(algorithms)
        self._leeway = leeway
        self._reactor = reactor

    @classmethod
    def from_secret(
        cls, secret: str | bytes, *, reactor: IReactorTime, leeway: float = 30
    ) -> LocalVerifier:
        """A verifier for HS256 tokens signed with a shared secret."""
        return cls(secret, ["HS256"], leeway, reactor=reactor)

    @classmethod
    def from_public_key_file(
        cls, path: str, *, reactor: IReactorTime, leeway: float = 30
    ) -> LocalVerifier:
        """A verifier for tokens signed by the holder of a private key.

        The algorithm follows from the key (RSA: RS256; EC P-256/384/521:
        ES256/384/512) so that configuration cannot pair a key with the
        wrong algorithm family.

        Args:
            path: PEM file holding the public key.
            reactor: Source of "now".
            leeway: Seconds of clock skew tolerated on ``exp`` and ``nbf``.

        Raises:
            ValueError: If the file is not a PEM public key of a supported
                type.
            OSError: If the file cannot be read.
        """
        with open(path, "rb") as f:
            pem = f.read()
        key = load_pem_public_key(pem)
        if isinstance(key, rsa.RSAPublicKey):
            algorithm = "RS256"
        elif isinstance(key, ec.EllipticCurvePublicKey) and (
            key.curve.name in _CURVE_ALGORITHMS
        ):
            algorithm = _CURVE_ALGORITHMS[key.curve.name]
        else:
            raise ValueError(f"unsupported public key type in {path}")
        return cls(pem, [algorithm], leeway, reactor=reactor)

    def verify(self, token: bytes) -> Deferred[Identity]:
        """Check ``token``'s signature and claims.

        Args:
            token: A bearer token as returned by `parse_bearer`.

        Returns:
            An already-fired Deferred: the `Identity` (``sub`` as user id,
            ``email`` or ``""``), or `InvalidToken`.
        """
        try:
            return defer.succeed(self._identity(token))
        except InvalidToken as e:
            return defer.fail(e)

    def _identity(self, token: bytes) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={
                    "require": ["sub", "exp"],
                    # Checked below against the reactor's clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError as e:
            raise InvalidToken(f"JWT rejected: {e}") from None
        now = self._reactor.seconds()
        exp = _numeric_date(claims["exp"])
        if exp is None:
            raise InvalidToken("JWT exp is not a number")
        if exp <= now - self._leeway:
            raise InvalidToken("JWT expired")
        if "nbf" in claims:
            nbf = _numeric_date(claims["nbf"])
            if nbf is None or nbf > now + self._leeway:
                raise InvalidToken("JWT not yet valid")
        email = claims.get("email", "")
        if not isinstance(email, str):
            raise InvalidToken("JWT email is not a string")
        try:
            return Identity(user_id=claims["sub"], email=email)
        except ValueError as e:
            raise InvalidToken(f"JWT identity unusable: {e}") from None


def _numeric_date(value: object) -> float | None:
    """A JWT NumericDate (RFC 7519 §2) as a float, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    # json.loads accepts NaN and Infinity, which would poison comparisons.
    return float(value) if math.isfinite(value) else None


def _unverified_exp(token: bytes) -> float | None:
    """Read a JWT's ``exp`` claim without checking anything else.

    Only used to bound how long the cache keeps a result the inner verifier
    has already accepted; opaque (non-JWT) tokens simply have no bound.
    """
    parts = token.split(b".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64url_decode(parts[1]))
    except (ValueError, RecursionError):
        return None
    if not isinstance(claims, dict):
        return None
    return _numeric_date(claims.get("exp"))


@dataclass
class _Entry:
    """A cached outcome: an identity, or a rejection to repeat."""

    outcome: Identity | InvalidToken
    expires_at: float


@dataclass
class _Flight:
    """One inner verification, and the callers waiting for its outcome."""

    waiters: list[Deferred[Identity]] = field(default_factory=list)
    inner: Deferred[Identity] | None = None


class CachingVerifier:
    """Remembers verification outcomes briefly, and merges concurrent ones.

    - An identity is kept ``ttl`` seconds, never past the token's own
      ``exp``; a rejection is kept ``negative_ttl`` seconds so that a client
      retrying a bad token in a loop does not hammer the auth service.
      `AuthUnavailable` is never kept: the next request tries again.
    - Single flight: callers asking about a token whose verification is
      already running wait for that one call instead of starting their own.
      Cancelling one caller (its client went away) leaves the others waiting;
      when every caller has gone, the inner call is cancelled too.
    - At most ``max_entries`` outcomes are kept, least recently used evicted
      first, keyed by the token's SHA-256 digest so no raw token is retained.

    With ``ttl == 0`` the cache is bypassed entirely ("0 =
    verify every request"): no stored outcomes, negative ones included, and no
    single flight either, since joining a call that started before the
    request arrived would not be verifying *that* request.
    """

    def __init__(
        self,
        inner: Verifier,
        reactor: IReactorTime,
        ttl: float = 10,
        negative_ttl: float = 1.0,
        max_entries: int = 10000,
    ) -> None:
        """Wrap ``inner``.

        Args:
            inner: The verifier that decides.
            reactor: Source of "now" for expiry.
            ttl: Seconds an identity is reused; 0 disables caching.
            negative_ttl: Seconds a rejection is reused; 0 disables that.
            max_entries: Bound on stored outcomes.

        Raises:
            ValueError: If a duration is negative or ``max_entries`` < 1.
        """
        if ttl < 0 or negative_ttl < 0:
            raise ValueError("cache durations must not be negative")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._inner = inner
        self._reactor = reactor
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._flights: dict[bytes, _Flight] = {}

    def remembers(self, token: bytes) -> bool:
        """Whether verifying ``token`` now would start no verification of its own:
        its outcome is remembered, or a verification of it is under way."""
        if self._ttl == 0:
            return False
        key = hashlib.sha256(token).digest()
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at > self._reactor.seconds():
            return True
        return key in self._flights

    def verify(self, token: bytes) -> Deferred[Identity]:
        """Verify ``token``, from memory when possible.

        Args:
            token: A bearer token as returned by `parse_bearer`.

        Returns:
            A Deferred of this caller's own (safe to cancel), firing with the
            `Identity` or failing with `InvalidToken` or `AuthUnavailable`.
        """
        if self._ttl == 0:
            return self._inner.verify(token)
        key = hashlib.sha256(token).digest()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires_at > self._reactor.seconds():
                self._entries.move_to_end(key)
                if isinstance(entry.outcome, InvalidToken):
                    return defer.fail(entry.outcome)
                return defer.succeed(entry.outcome)
            del self._entries[key]

        flight = self._flights.get(key)
        starting = flight is None
        if flight is None:
            flight = self._flights[key] = _Flight()
        waiter: Deferred[Identity] = Deferred(
            lambda d: self._abandon(key, flight, d)
        )
        flight.waiters.append(waiter)
        if starting:
            # Registered before the call starts: an inner verifier that
            # answers synchronously (LocalVerifier) must find this waiter.
            inner = defer.maybeDeferred(self._inner.verify, token)
            flight.inner = inner
            inner.addBoth(self._landed, key, flight, _unverified_exp(token))
        return waiter

    def _landed(
        self,
        result: Identity | Failure,
        key: bytes,
        flight: _Flight,
        token_exp: float | None,
    ) -> None:
        """Store the outcome if it may be reused, then answer every waiter."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        now = self._reactor.seconds()
        if isinstance(result, Identity):
            expires_at = now + self._ttl
            if token_exp is not None:
                expires_at = min(expires_at, token_exp)
            self._store(key, _Entry(result, expires_at), now)
        elif result.check(InvalidToken) and self._negative_ttl > 0:
            # Drop the traceback: the entry would otherwise pin its frames.
            rejection = result.value.with_traceback(None)
            self._store(key, _Entry(rejection, now + self._negative_ttl), now)
        waiters, flight.waiters = flight.waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _store(self, key: bytes, entry: _Entry, now: float) -> None:
        if entry.expires_at <= now:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def _abandon(self, key: bytes, flight: _Flight, waiter: Deferred[Identity]) -> None:
        """Forget a caller that cancelled; cancel the call once nobody waits."""
        flight.waiters.remove(waiter)
        if flight.waiters:
            return
        if self._flights.get(key) is flight:
            del self._flights[key]
        assert flight.inner is not None
        flight.inner.cancel()
