"""The demo auth service: its HTTP contract, persistence and token rules."""

from __future__ import annotations

import os
import sqlite3
import stat
from typing import TYPE_CHECKING, Any

import jwt
import pytest
import pytest_twisted
from twisted.internet.task import Clock

from deltagw.demo.auth import InvalidToken, TokenAuthority
from deltagw.demo.platform import DATABASE_FILE, SECRET_FILE, DemoPlatform

if TYPE_CHECKING:
    from conftest import Client, MakePlatform

ALICE = {"email": "alice@example.com", "password": "correct horse", "name": "Alice"}


async def register(client: Client, platform: DemoPlatform, **fields: str) -> Any:
    """Register ALICE (with ``fields`` overriding) and return the reply body."""
    reply = await client.post(f"{platform.urls['auth']}/register", {**ALICE, **fields})
    assert reply.status == 201, reply.body
    return reply.json


def claims_of(token: str, secret: str) -> dict[str, Any]:
    """Decode a token's claims, checking only its signature."""
    return jwt.decode(
        token, secret, algorithms=["HS256"], options={"verify_exp": False}
    )


@pytest_twisted.ensureDeferred
async def test_register_returns_a_token_and_the_user(
    client: Client, platform: DemoPlatform, jwt_secret: str
) -> None:
    """Registering answers 201 with a 24-hour JWT naming the new user."""
    reply = await client.post(f"{platform.urls['auth']}/register", ALICE)

    assert reply.status == 201
    assert reply.content_type == "application/json"
    body = reply.json
    assert body["message"] == "User registered successfully"
    assert body["user"] == {"id": 1, "email": "alice@example.com", "name": "Alice"}
    claims = claims_of(body["token"], jwt_secret)
    assert set(claims) == {"sub", "email", "jti", "iat", "exp"}
    assert claims["sub"] == "1"
    assert claims["email"] == "alice@example.com"
    assert claims["exp"] - claims["iat"] == 24 * 3600


@pytest.mark.parametrize(
    "request_kwargs",
    [
        pytest.param(
            {"json_body": {**ALICE, "email": "alice.example.com"}}, id="bad-email"
        ),
        pytest.param(
            {"json_body": {**ALICE, "email": "al ice@example.com"}}, id="spaced-email"
        ),
        pytest.param(
            {"json_body": {**ALICE, "password": "1234567"}}, id="short-password"
        ),
        pytest.param(
            {"json_body": {"email": ALICE["email"], "password": "p" * 8}},
            id="missing-name",
        ),
        pytest.param({"json_body": {**ALICE, "name": "  "}}, id="blank-name"),
        pytest.param(
            {"json_body": {**ALICE, "password": 12345678}}, id="number-password"
        ),
        pytest.param({"json_body": [ALICE]}, id="json-array"),
        pytest.param({"data": b"email=alice@example.com"}, id="not-json"),
        pytest.param({"data": b"\xff\xfe"}, id="not-utf8"),
        pytest.param(
            {"data": b'{"email": "a@b.co", "password": "\\ud800-long", "name": "A"}'},
            id="lone-surrogate",
        ),
        pytest.param({}, id="empty-body"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_register_rejects_bad_input(
    client: Client, platform: DemoPlatform, request_kwargs: dict[str, Any]
) -> None:
    """Invalid or missing fields and non-JSON bodies get a JSON 400."""
    reply = await client.request(
        "POST", f"{platform.urls['auth']}/register", **request_kwargs
    )

    assert reply.status == 400
    assert reply.content_type == "application/json"
    assert isinstance(reply.json["error"], str)


@pytest_twisted.ensureDeferred
async def test_register_refuses_an_email_already_registered(
    client: Client, platform: DemoPlatform
) -> None:
    """A second registration of the same email, in any case, gets 409."""
    await register(client, platform)

    reply = await client.post(
        f"{platform.urls['auth']}/register", {**ALICE, "email": "Alice@Example.COM"}
    )

    assert reply.status == 409
    assert reply.json == {"error": "Email already registered"}


@pytest_twisted.ensureDeferred
async def test_login_returns_a_token_for_the_user(
    client: Client, platform: DemoPlatform
) -> None:
    """Correct credentials get 200 with a token that verifies as the user."""
    await register(client, platform)

    reply = await client.post(
        f"{platform.urls['auth']}/login",
        {"email": "ALICE@example.com", "password": ALICE["password"]},
    )

    assert reply.status == 200
    assert reply.json["user"] == {
        "id": 1,
        "email": "alice@example.com",
        "name": "Alice",
    }
    verified = await client.post(
        f"{platform.urls['auth']}/verify", {"token": reply.json["token"]}
    )
    assert verified.json == {"valid": True, "user_id": 1, "email": "alice@example.com"}


@pytest_twisted.ensureDeferred
async def test_login_failure_does_not_reveal_whether_the_email_exists(
    client: Client, platform: DemoPlatform
) -> None:
    """A wrong password and an unknown email get the same 401."""
    await register(client, platform)
    url = f"{platform.urls['auth']}/login"

    wrong_password = await client.post(
        url, {"email": ALICE["email"], "password": "incorrect horse"}
    )
    unknown_email = await client.post(
        url, {"email": "bob@example.com", "password": ALICE["password"]}
    )

    assert wrong_password.status == unknown_email.status == 401
    assert wrong_password.body == unknown_email.body
    assert wrong_password.json == {"error": "Invalid email or password"}


@pytest_twisted.ensureDeferred
async def test_login_rejects_a_body_without_credentials(
    client: Client, platform: DemoPlatform
) -> None:
    """A login body missing the password gets a JSON 400."""
    reply = await client.post(
        f"{platform.urls['auth']}/login", {"email": ALICE["email"]}
    )

    assert reply.status == 400
    assert reply.json == {"error": "Missing required field(s): password"}


def forged(secret: str, **changes: Any) -> str:
    """A token for user 1 signed with ``secret``; a change to None drops a claim."""
    claims = {
        "sub": "1",
        "email": ALICE["email"],
        "jti": "forged",
        "iat": 1,
        "exp": 4_102_444_800,  # 2100-01-01
    }
    claims.update(changes)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret)


def tampered(token: str, secret: str) -> str:
    """Change one character of the token's payload, keeping its signature."""
    header, payload, signature = token.split(".")
    replacement = "A" if payload[5] != "A" else "B"
    return ".".join([header, payload[:5] + replacement + payload[6:], signature])


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda good, key: forged(key, exp=2), id="expired"),
        pytest.param(tampered, id="tampered"),
        pytest.param(
            lambda good, key: forged("another-secret-of-at-least-32-bytes!!"),
            id="wrong-secret",
        ),
        pytest.param(
            lambda good, key: jwt.encode(claims_of(good, key), "", algorithm="none"),
            id="alg-none",
        ),
        pytest.param(lambda good, key: forged(key, jti=None), id="no-jti"),
        pytest.param(lambda good, key: forged(key, sub="alice"), id="non-numeric-sub"),
        pytest.param(lambda good, key: forged(key, exp="never"), id="string-exp"),
        pytest.param(lambda good, key: "not.a.jwt", id="malformed"),
        pytest.param(lambda good, key: "", id="empty"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_verify_rejects_invalid_tokens(
    client: Client, platform: DemoPlatform, jwt_secret: str, make_token: Any
) -> None:
    """Expired, tampered, foreign, unsigned and malformed tokens get 401."""
    good = (await register(client, platform))["token"]

    reply = await client.post(
        f"{platform.urls['auth']}/verify", {"token": make_token(good, jwt_secret)}
    )

    assert reply.status == 401
    assert reply.json == {"error": "Invalid token"}


@pytest_twisted.ensureDeferred
async def test_logout_revokes_only_that_token(
    client: Client, platform: DemoPlatform
) -> None:
    """After logout the token no longer verifies, but other sessions still do."""
    auth = platform.urls["auth"]
    token = (await register(client, platform))["token"]
    other = (
        await client.post(
            f"{auth}/login", {"email": ALICE["email"], "password": ALICE["password"]}
        )
    ).json["token"]

    logout = await client.post(
        f"{auth}/logout", headers={"Authorization": f"Bearer {token}"}
    )

    assert logout.status == 200
    assert logout.json == {"message": "Logged out"}
    assert (await client.post(f"{auth}/verify", {"token": token})).status == 401
    assert (await client.post(f"{auth}/verify", {"token": other})).status == 200
    again = await client.post(
        f"{auth}/logout", headers={"Authorization": f"Bearer {token}"}
    )
    assert again.status == 401


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param({}, "Missing Authorization header", id="missing"),
        pytest.param(
            {"Authorization": "Basic YWxpY2U6eA=="}, "Invalid token", id="basic"
        ),
        pytest.param({"Authorization": "Bearer"}, "Invalid token", id="no-token"),
        pytest.param(
            {"Authorization": "Bearer not.a.jwt"}, "Invalid token", id="garbage"
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_logout_requires_a_valid_bearer_token(
    client: Client, platform: DemoPlatform, headers: dict[str, str], message: str
) -> None:
    """Logout without a valid bearer token gets a 401 with a Bearer challenge."""
    reply = await client.post(f"{platform.urls['auth']}/logout", headers=headers)

    assert reply.status == 401
    assert reply.json == {"error": message}
    assert (reply.header("www-authenticate") or "").startswith("Bearer ")


@pytest_twisted.ensureDeferred
async def test_logout_accepts_the_scheme_in_any_case(
    client: Client, platform: DemoPlatform
) -> None:
    """The auth scheme is case-insensitive (RFC 9110 §11.1)."""
    token = (await register(client, platform))["token"]

    reply = await client.post(
        f"{platform.urls['auth']}/logout", headers={"Authorization": f"bearer {token}"}
    )

    assert reply.status == 200


@pytest_twisted.ensureDeferred
async def test_passwords_are_stored_only_as_salted_scrypt_hashes(
    client: Client, platform: DemoPlatform, state_dir: Any
) -> None:
    """The database holds a salted scrypt hash, never the password itself."""
    await register(client, platform)
    await register(client, platform, email="bob@example.com")
    await platform.stopService()

    with sqlite3.connect(state_dir.child(DATABASE_FILE).path) as db:
        hashes = [row[0] for row in db.execute("SELECT password_hash FROM users")]

    assert len(hashes) == 2
    assert all(h.startswith("scrypt$") for h in hashes)
    assert all(ALICE["password"] not in h for h in hashes)
    assert hashes[0] != hashes[1]  # Same password, different salts.


@pytest_twisted.ensureDeferred
async def test_users_survive_a_restart(
    client: Client, start_platform: MakePlatform
) -> None:
    """A user registered before a restart can log in after it."""
    first = start_platform()
    await register(client, first)
    await first.stopService()

    second = start_platform()
    reply = await client.post(
        f"{second.urls['auth']}/login",
        {"email": ALICE["email"], "password": ALICE["password"]},
    )

    assert reply.status == 200
    assert reply.json["user"]["id"] == 1


@pytest_twisted.ensureDeferred
async def test_revocations_survive_a_restart(
    client: Client, start_platform: MakePlatform
) -> None:
    """A token logged out before a restart is still refused after it."""
    first = start_platform()
    token = (await register(client, first))["token"]
    await client.post(
        f"{first.urls['auth']}/logout", headers={"Authorization": f"Bearer {token}"}
    )
    await first.stopService()

    second = start_platform()
    reply = await client.post(f"{second.urls['auth']}/verify", {"token": token})

    assert reply.status == 401


@pytest_twisted.ensureDeferred
async def test_generated_secret_is_private_and_kept(
    client: Client, start_platform: MakePlatform, state_dir: Any
) -> None:
    """Without a configured secret, one is generated, private, and reused."""
    first = start_platform(jwt_secret=None)
    token = (await register(client, first))["token"]
    await first.stopService()
    secret_file = state_dir.child(SECRET_FILE)

    second = start_platform(jwt_secret=None)
    reply = await client.post(f"{second.urls['auth']}/verify", {"token": token})

    assert stat.S_IMODE(os.stat(secret_file.path).st_mode) == 0o600
    assert reply.status == 200
    claims_of(token, secret_file.getContent().decode("ascii").strip())


@pytest_twisted.ensureDeferred
async def test_secret_comes_from_the_environment(
    client: Client, start_platform: MakePlatform, state_dir: Any
) -> None:
    """DEMO_JWT_SECRET signs the tokens when no secret is passed in."""
    from_env = "environment-secret-of-at-least-32-bytes!"
    platform = start_platform(jwt_secret=None, environ={"DEMO_JWT_SECRET": from_env})

    token = (await register(client, platform))["token"]

    assert claims_of(token, from_env)["email"] == ALICE["email"]
    assert not state_dir.child(SECRET_FILE).exists()


def test_tokens_expire_after_a_day(jwt_secret: str) -> None:
    """A token verifies until 24 hours after issue, by the reactor's clock."""
    clock = Clock()
    clock.advance(1_700_000_000)
    authority = TokenAuthority(clock, jwt_secret)
    token = authority.issue(7, "carol@example.com")

    clock.advance(24 * 3600 - 1)
    claims = authority.decode(token)
    clock.advance(1)

    assert (claims.user_id, claims.email) == (7, "carol@example.com")
    with pytest.raises(InvalidToken):
        authority.decode(token)
