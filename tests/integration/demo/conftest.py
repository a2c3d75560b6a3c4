"""Fixtures for the demo backends: running platforms and a JSON HTTP client."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.interfaces import IReactorTCP
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from deltagw.demo.platform import DemoPlatform

SECRET = "tests-only-jwt-secret-of-at-least-32-bytes"
TEST_SCRYPT_N = 2**4
"""Tiny scrypt cost: hashing is then microseconds, not tens of milliseconds."""


@pytest.fixture
def reactor() -> IReactorTCP:
    """The reactor pytest-twisted runs."""
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def jwt_secret() -> str:
    """The secret the test platforms sign tokens with."""
    return SECRET


@pytest.fixture
def state_dir(tmp_path: Any) -> FilePath[str]:
    """A fresh demo state directory (not yet created on disk)."""
    return FilePath(str(tmp_path)).child("state")


MakePlatform = Callable[..., DemoPlatform]


@pytest.fixture
def make_platform(
    reactor: IReactorTCP, state_dir: FilePath[str]
) -> Iterator[MakePlatform]:
    """Build platforms with test settings; stop the running ones at teardown."""
    made: list[DemoPlatform] = []

    def make(**overrides: Any) -> DemoPlatform:
        options: dict[str, Any] = {
            "state_dir": state_dir,
            "jwt_secret": SECRET,
            "scrypt_n": TEST_SCRYPT_N,
            "environ": {},
        }
        options.update(overrides)
        platform = DemoPlatform(reactor, **options)
        made.append(platform)
        return platform

    yield make
    for platform in made:
        if platform.running:
            pytest_twisted.blockon(platform.stopService())


@pytest.fixture
def start_platform(make_platform: MakePlatform) -> MakePlatform:
    """Build and start a platform the way twistd does."""

    def start(**overrides: Any) -> DemoPlatform:
        platform = make_platform(**overrides)
        platform.privilegedStartService()
        platform.startService()
        return platform

    return start


@pytest.fixture
def platform(start_platform: MakePlatform) -> DemoPlatform:
    """A running platform with the test secret."""
    return start_platform()


@dataclass(frozen=True)
class Reply:
    """A decoded HTTP response."""

    status: int
    headers: Headers
    body: bytes

    @property
    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)

    @property
    def content_type(self) -> str | None:
        """The Content-Type header, if any."""
        values = self.headers.getRawHeaders("content-type")
        return None if values is None else values[0]

    def header(self, name: str) -> str | None:
        """The first value of header ``name``, if any."""
        values = self.headers.getRawHeaders(name)
        return None if values is None else values[0]


class Client:
    """A treq client that returns whole :class:`Reply` objects.

    Connections are not kept alive, so nothing is left open when a test ends.
    """

    def __init__(self, reactor: IReactorTCP) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self._http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
    ) -> Reply:
        """Send a request and read the whole response."""
        kwargs: dict[str, Any] = {"headers": headers, "params": params}
        if json_body is not None:
            kwargs["json"] = json_body
        if data is not None:
            kwargs["data"] = data
        response = await self._http.request(method, url, **kwargs)
        body = await response.content()
        return Reply(response.code, response.headers, body)

    async def get(self, url: str, params: Any = None) -> Reply:
        """GET ``url`` with query ``params``."""
        return await self.request("GET", url, params=params)

    async def post(self, url: str, body: Any = None, **kwargs: Any) -> Reply:
        """POST ``body`` as JSON (when given) to ``url``."""
        return await self.request("POST", url, json_body=body, **kwargs)


@pytest.fixture
def client(reactor: IReactorTCP) -> Client:
    """An HTTP client for the demo services."""
    return Client(reactor)
