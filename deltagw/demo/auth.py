"""The demo auth service: registration, login, token verification, logout.

Tokens are HS256 JWTs carrying ``sub`` (the user id), ``email``, ``jti``,
``iat`` and ``exp``. Users and revoked token ids live in SQLite in the demo
state directory, so both survive a restart. Nothing slow runs on the reactor
thread: SQLite runs on an adbapi connection pool and scrypt on a thread pool
of its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any

import jwt
from klein import Klein
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from twisted.web.iweb import IRequest

from deltagw.demo._http import ApiError, install_json_errors, json_body, read_json_object

DEFAULT_SCRYPT_N = 2**14
"""scrypt CPU/memory cost; tests pass a tiny value to stay fast."""

SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
"""Room for n up to 2**15 with r=8 (OpenSSL's default cap is 32 MiB)."""

TOKEN_LIFETIME = 24 * 3600.0
"""Seconds a token stays valid after it is issued."""

MIN_PASSWORD_LENGTH = 8

# Deliberately loose: one "@", a dot in the domain, no whitespace. Whether an
# address really exists is only known by mailing it.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_DIGITS = re.compile(r"[0-9]+")

_NEVER_STORED = b"no-store"
"""Tokens and identities are for one client only: no cache may keep them (RFC 9111 §5.2.2.5)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class User:
    """A registered user.

    Attributes:
        id: Database id; the token's ``sub``.
        email: Lower-cased address, unique.
        name: Display name.
        password_hash: Encoded scrypt hash (see :class:`PasswordHasher`).
    """

    id: int
    email: str
    name: str
    password_hash: str

    def public(self) -> dict[str, object]:
        """The fields a client may see."""
        return {"id": self.id, "email": self.email, "name": self.name}


class PasswordHasher:
    """Salted scrypt hashing on a thread pool this object owns.

    scrypt is deliberately slow (tens of milliseconds at the default cost),
    which would stall every other connection if it ran on the reactor.

    Hashes are encoded as ``scrypt$n$r$p$salt$digest`` (base64) so that each
    carries its own cost: a hash made with the test cost still verifies under
    the production cost, and the cost can be raised without a migration.

    Args:
        reactor: Delivers results back to the reactor thread.
        n: scrypt cost parameter for new hashes (a power of two).
        max_threads: Hashes computed at the same time.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        n: int = DEFAULT_SCRYPT_N,
        max_threads: int = 4,
    ) -> None:
        self._reactor = reactor
        self._n = n
        self._pool = ThreadPool(
            minthreads=0, maxthreads=max_threads, name="deltagw-demo-scrypt"
        )
        # Checked against when a login names an unknown email, so that the
        # answer takes as long as for a wrong password and does not reveal
        # which emails are registered.
        zeros = base64.b64encode(bytes(32)).decode("ascii")
        self.decoy_hash = f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${zeros}${zeros}"

    def start(self) -> None:
        """Start the worker threads."""
        self._pool.start()

    def stop(self) -> None:
        """Stop the worker threads, after the hashes in progress finish."""
        self._pool.stop()

    def hash(self, password: str) -> Deferred[str]:
        """Hash ``password`` with a fresh random salt.

        Returns:
            A Deferred firing with the encoded hash.
        """
        return deferToThreadPool(self._reactor, self._pool, self._hash, password)

    def verify(self, password: str, encoded: str) -> Deferred[bool]:
        """Check ``password`` against an encoded hash, in constant time.

        Returns:
            A Deferred firing with True when the password matches.
        """
        return deferToThreadPool(
            self._reactor, self._pool, self._verify, password, encoded
        )

    def _hash(self, password: str) -> str:
        salt = secrets.token_bytes(16)
        digest = _scrypt(password, salt, self._n, SCRYPT_R, SCRYPT_P)
        encode = base64.b64encode
        return (
            f"scrypt${self._n}${SCRYPT_R}${SCRYPT_P}$"
            f"{encode(salt).decode('ascii')}${encode(digest).decode('ascii')}"
        )

    def _verify(self, password: str, encoded: str) -> bool:
        _, n, r, p, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
        return hmac.compare_digest(actual, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_SCRYPT_MAXMEM,
        dklen=32,
    )


def _create_schema(connection: sqlite3.Connection) -> None:
    # Runs in the pool's thread each time it opens a connection, so the
    # tables exist before any query, with no ordering to get wrong.
    connection.executescript(_SCHEMA)


class UserStore:
    """Users and revoked tokens in SQLite, queried off the reactor thread.

    One connection serialises every statement, which is all SQLite allows for
    writes anyway and spares "database is locked" retries.

    Args:
        reactor: The reactor the pool reports results to.
        path: The database file (created if missing).
    """

    def __init__(self, reactor: IReactorCore, path: str) -> None:
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            # adbapi opens connections in its worker thread but closes them
            # from the reactor thread on shutdown.
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_create_schema,
            cp_reactor=reactor,
        )

    def close(self) -> None:
        """Close the connection and stop the pool's thread."""
        self._pool.close()

    def add_user(
        self, email: str, name: str, password_hash: str, created_at: float
    ) -> Deferred[User | None]:
        """Insert a user.

        Returns:
            A Deferred firing with the new user, or None if the email is
            already registered (the UNIQUE constraint decides, so two
            concurrent registrations cannot both succeed).
        """

        def insert(cursor: Any) -> User | None:
            try:
                cursor.execute(
                    "INSERT INTO users (email, name, password_hash, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (email, name, password_hash, created_at),
                )
            except sqlite3.IntegrityError:
                return None
            return User(cursor.lastrowid, email, name, password_hash)

        added: Deferred[User | None] = self._pool.runInteraction(insert)
        return added

    def find_user(self, email: str) -> Deferred[User | None]:
        """Look a user up by (lower-cased) email.

        Returns:
            A Deferred firing with the user, or None.
        """

        def select(cursor: Any) -> User | None:
            cursor.execute(
                "SELECT id, email, name, password_hash FROM users WHERE email = ?",
                (email,),
            )
            row = cursor.fetchone()
            return None if row is None else User(*row)

        found: Deferred[User | None] = self._pool.runInteraction(select)
        return found

    def revoke(self, jti: str, expires_at: float, now: float) -> Deferred[None]:
        """Record that token ``jti`` is revoked until it would expire anyway.

        Revocations of tokens that have expired are dropped at the same time:
        an expired token is refused regardless, so the table stays small.
        """

        def record(cursor: Any) -> None:
            cursor.execute("DELETE FROM revoked_tokens WHERE expires_at <= ?", (now,))
            cursor.execute(
                "INSERT OR IGNORE INTO revoked_tokens (jti, expires_at) VALUES (?, ?)",
                (jti, expires_at),
            )

        recorded: Deferred[None] = self._pool.runInteraction(record)
        return recorded

    def is_revoked(self, jti: str) -> Deferred[bool]:
        """Tell whether token ``jti`` was revoked.

        Returns:
            A Deferred firing with True if it was.
        """

        def select(cursor: Any) -> bool:
            cursor.execute("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,))
            return cursor.fetchone() is not None

        revoked: Deferred[bool] = self._pool.runInteraction(select)
        return revoked


class InvalidToken(Exception):
    """A token that is malformed, tampered with, or expired."""


@dataclass(frozen=True)
class Claims:
    """What a valid token says.

    Attributes:
        user_id: The user (``sub``).
        email: The user's email when the token was issued.
        jti: Unique token id, the key for revocation.
        expires_at: ``exp``, in epoch seconds.
    """

    user_id: int
    email: str
    jti: str
    expires_at: float


class TokenAuthority:
    """Issues and checks HS256 JWTs against the reactor's clock.

    PyJWT would check ``exp`` and ``iat`` against the wall clock; those
    checks are turned off and ``exp`` is compared with ``clock.seconds()``
    instead, so that tests can move time with ``task.Clock``.

    Args:
        clock: Source of the current time.
        secret: HMAC key.
        lifetime: Seconds from issue to expiry.
    """

    def __init__(
        self, clock: IReactorTime, secret: str, lifetime: float = TOKEN_LIFETIME
    ) -> None:
        self._clock = clock
        self._secret = secret
        self._lifetime = lifetime

    def issue(self, user_id: int, email: str) -> str:
        """Make a token for a user, valid from now for the lifetime."""
        issued_at = int(self._clock.seconds())
        claims = {
            "sub": str(user_id),  # RFC 7519 §4.1.2: sub is a string.
            "email": email,
            "jti": secrets.token_urlsafe(16),
            "iat": issued_at,
            "exp": issued_at + int(self._lifetime),
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def decode(self, token: str) -> Claims:
        """Check a token's signature, claims and expiry.

        Raises:
            InvalidToken: If any check fails.
        """
        try:
            payload = jwt.decode(
                token,
                self._secret,
                # Pinning the algorithm refuses "none" and key-confusion tricks.
                algorithms=["HS256"],
                options={
                    "require": ["sub", "email", "jti", "iat", "exp"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError as error:
            raise InvalidToken(str(error)) from None
        sub, email, expires_at = payload["sub"], payload["email"], payload["exp"]
        if not _DIGITS.fullmatch(sub) or not isinstance(email, str):
            raise InvalidToken("malformed claims")
        if not isinstance(expires_at, (int, float)):
            raise InvalidToken("malformed exp")
        if expires_at <= self._clock.seconds():
            raise InvalidToken("expired")
        return Claims(int(sub), email, payload["jti"], float(expires_at))


def load_or_create_secret(path: FilePath[str]) -> str:
    """Return the JWT secret kept at ``path``, generating it the first time.

    The file is created with mode 0600 in one step (O_EXCL), so the secret is
    never readable by others, not even briefly.

    Raises:
        ValueError: If the file exists but is empty.
    """
    try:
        fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.getContent().decode("ascii").strip()
        if not secret:
            raise ValueError(f"JWT secret file {path.path} is empty") from None
        return secret
    secret = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret


def _string_fields(body: dict[str, Any], *names: str) -> list[str]:
    missing = [name for name in names if name not in body]
    if missing:
        raise ApiError(400, f"Missing required field(s): {', '.join(missing)}")
    for name in names:
        value = body[name]
        if not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string")
        # JSON escapes can spell lone surrogates, which neither SQLite nor
        # scrypt's UTF-8 encoding accept.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{name} must be valid Unicode") from None
    return [body[name] for name in names]


class AuthBackend:
    """Klein app for the auth routes.

    Args:
        clock: Source of the current time.
        store: Users and revocations.
        hasher: Password hashing.
        tokens: Token issue and checks.
    """

    app = Klein()
    install_json_errors(app)

    def __init__(
        self,
        clock: IReactorTime,
        store: UserStore,
        hasher: PasswordHasher,
        tokens: TokenAuthority,
    ) -> None:
        self._clock = clock
        self._store = store
        self._hasher = hasher
        self._tokens = tokens

    @app.route("/register", methods=["POST"])
    async def register(self, request: IRequest) -> bytes:
        """Create an account and log it in (201), or 400/409."""
        email, password, name = _string_fields(
            read_json_object(request), "email", "password", "name"
        )
        # Addresses are compared case-insensitively: nobody expects
        # Alice@Example.com and alice@example.com to be two accounts.
        email = email.strip().lower()
        name = name.strip()
        if not _EMAIL.fullmatch(email):
            raise ApiError(400, "Invalid email address")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ApiError(
                400, f"Password must be at least {MIN_PASSWORD_LENGTH} characters"
            )
        if not name:
            raise ApiError(400, "name must not be empty")
        password_hash = await self._hasher.hash(password)
        user = await self._store.add_user(
            email, name, password_hash, self._clock.seconds()
        )
        if user is None:
            raise ApiError(409, "Email already registered")
        return json_body(
            request,
            201,
            {
                "message": "User registered successfully",
                "token": self._tokens.issue(user.id, user.email),
                "user": user.public(),
            },
            cache_control=_NEVER_STORED,
        )

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        """Exchange credentials for a token (200), or 401.

        The 401 is identical, and takes as long, whether the email is
        unknown or the password wrong, so it reveals no registrations.
        """
        email, password = _string_fields(read_json_object(request), "email", "password")
        user = await self._store.find_user(email.strip().lower())
        matches = await self._hasher.verify(
            password, self._hasher.decoy_hash if user is None else user.password_hash
        )
        if user is None or not matches:
            raise ApiError(401, "Invalid email or password")
        return json_body(
            request,
            200,
            {"token": self._tokens.issue(user.id, user.email), "user": user.public()},
            cache_control=_NEVER_STORED,
        )

    @app.route("/verify", methods=["POST"])
    async def verify(self, request: IRequest) -> bytes:
        """Say whom a token belongs to (200), or 401 if it is not valid."""
        (token,) = _string_fields(read_json_object(request), "token")
        claims = await self._check(token)
        return json_body(
            request,
            200,
            {"valid": True, "user_id": claims.user_id, "email": claims.email},
            cache_control=_NEVER_STORED,
        )

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: IRequest) -> bytes:
        """Revoke the bearer token of the request, so it no longer verifies."""
        header = request.getHeader("authorization")
        if header is None:
            # RFC 6750 §3: a 401 names the scheme the client should use.
            raise ApiError(
                401,
                "Missing Authorization header",
                {"WWW-Authenticate": 'Bearer realm="deltastream"'},
            )
        scheme, _, token = header.partition(" ")
        # RFC 9110 §11.1: the scheme name is case-insensitive.
        if scheme.lower() != "bearer" or not token.strip():
            raise _invalid_bearer()
        try:
            claims = await self._check(token.strip())
        except ApiError:
            raise _invalid_bearer() from None
        await self._store.revoke(claims.jti, claims.expires_at, self._clock.seconds())
        return json_body(request, 200, {"message": "Logged out"}, cache_control=_NEVER_STORED)

    async def _check(self, token: str) -> Claims:
        try:
            claims = self._tokens.decode(token)
        except InvalidToken:
            raise ApiError(401, "Invalid token") from None
        if await self._store.is_revoked(claims.jti):
            raise ApiError(401, "Invalid token")
        return claims


def _invalid_bearer() -> ApiError:
    return ApiError(
        401,
        "Invalid token",
        {"WWW-Authenticate": 'Bearer realm="deltastream", error="invalid_token"'},
    )
