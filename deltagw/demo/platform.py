"""All three demo backends in one service, each on its own loopback port.

``twistd -n deltagw --demo`` adds a :class:`DemoPlatform` next to the gateway
and points the gateway at :attr:`DemoPlatform.urls`, so one command gives a
working platform. Tests use it the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorCore,
    IReactorFromThreads,
    IReactorTCP,
    IReactorTime,
)
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from deltagw.demo.analytics import AnalyticsBackend
from deltagw.demo.auth import (
    DEFAULT_SCRYPT_N,
    AuthBackend,
    PasswordHasher,
    TokenAuthority,
    UserStore,
    load_or_create_secret,
)
from deltagw.demo.market import DEFAULT_SEED, build_market
from deltagw.demo.storage import StorageBackend
from deltagw.logs import get_logger

DATABASE_FILE = "demo-auth.sqlite3"
SECRET_FILE = "demo-jwt-secret"
JWT_SECRET_VARIABLE = "DEMO_JWT_SECRET"


def default_state_dir() -> str:
    """Where the demo keeps its users, revocations and JWT secret.

    Follows the XDG Base Directory spec: ``$XDG_STATE_HOME/deltagw``, or
    ``~/.local/state/deltagw`` when the variable is unset or not absolute
    (the spec says to ignore a relative value).
    """
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "deltagw")


_log = get_logger(component="demo")


class DemoSite(Site):
    """A backend's Site whose access log is a JSON line marked with the backend.

    twisted.web's own line (combined log format) carries the whole URI, so a
    query such as ``?access_token=...`` would reach the log; here the path
    alone does, as in the gateway's own access log.
    """

    def __init__(self, service: str, resource: Any, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self._access_log = get_logger(component=f"demo-{service}")

    def log(self, request: Any) -> None:
        self._access_log.msg(
            "demo_request",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            status_code=request.code,
        )


class DemoPlatform(MultiService):
    """The reference auth, storage and analytics services.

    Each backend is a Klein app served by its own :class:`Site` on
    ``127.0.0.1`` and an ephemeral port. Ports are bound synchronously in
    :meth:`privilegedStartService` so that :attr:`urls` is known before the
    gateway is configured; starting is idempotent, so :meth:`startService`
    alone also works (for a platform added to an already running parent).

    Attributes:
        urls: Base URL of each backend by name (``auth``, ``storage``,
            ``analytics``), filled in when the ports are bound.

    Args:
        reactor: Listens, schedules and runs the thread pools.
        state_dir: Directory for the SQLite database and the generated JWT
            secret; created (mode 0700) if missing.
        jwt_secret: HMAC key for tokens. When None or empty,
            ``DEMO_JWT_SECRET`` from ``environ`` is used, and failing that a
            secret generated once and kept in ``state_dir`` (mode 0600).
        scrypt_n: scrypt cost for new password hashes; lower it only in tests.
        seed: Seed of the generated market.
        environ: Environment to read ``DEMO_JWT_SECRET`` from (default
            ``os.environ``).
    """


    def __init__(
        self,
        reactor: IReactorTCP,
        state_dir: FilePath[str] | str,
        jwt_secret: str | None = None,
        *,
        scrypt_n: int = DEFAULT_SCRYPT_N,
        seed: int = DEFAULT_SEED,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._state_dir = (
            FilePath(state_dir) if isinstance(state_dir, str) else state_dir
        )
        environ = os.environ if environ is None else environ
        self._jwt_secret = jwt_secret or environ.get(JWT_SECRET_VARIABLE) or None
        self._scrypt_n = scrypt_n
        self._market = build_market(seed)
        self.urls: dict[str, str] = {}
        self._ports: list[IListeningPort] = []
        self._store: UserStore | None = None
        self._hasher: PasswordHasher | None = None

    def privilegedStartService(self) -> None:
        """Open the state directory and database, and bind the ports."""
        self._open()
        super().privilegedStartService()

    def startService(self) -> None:
        """Start, binding the ports first if that has not happened yet."""
        self._open()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Close the ports, then the database pool and the hashing threads.

        Returns:
            A Deferred that fires once every port has stopped listening and
            the pools are closed.
        """
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        ports, self._ports = self._ports, []
        try:
            await gatherResults(
                [
                    super().stopService(),
                    *(maybeDeferred(port.stopListening) for port in ports),
                ]
            )
        finally:
            # The ports are closed, so no new request can reach the database;
            # queries already queued finish before the pools stop.
            self._close_pools()

    def _open(self) -> None:
        if self._ports:
            return
        os.makedirs(self._state_dir.path, mode=0o700, exist_ok=True)
        secret = self._jwt_secret or load_or_create_secret(
            self._state_dir.child(SECRET_FILE)
        )
        clock = IReactorTime(self._reactor)
        self._hasher = PasswordHasher(
            IReactorFromThreads(self._reactor), self._scrypt_n
        )
        self._hasher.start()
        self._store = UserStore(
            IReactorCore(self._reactor), self._state_dir.child(DATABASE_FILE).path
        )
        backends = {
            "auth": AuthBackend(
                clock, self._store, self._hasher, TokenAuthority(clock, secret)
            ).app,
            "storage": StorageBackend(self._market).app,
            "analytics": AnalyticsBackend(self._market).app,
        }
        for name, app in backends.items():
            site = DemoSite(name, app.resource(), reactor=self._reactor)
            site.noisy = False  # The line below says where it listens.
            # Site is a ServerFactory; Twisted's annotations do not say so.
            port = self._reactor.listenTCP(
                0,
                site,  # type: ignore[arg-type]
                interface="127.0.0.1",
            )
            self._ports.append(port)
            address = port.getHost()
            assert isinstance(address, IPv4Address)
            self.urls[name] = f"http://127.0.0.1:{address.port}"
            _log.msg("demo_listening", service=name, url=self.urls[name])

    def _close_pools(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._hasher is not None:
            self._hasher.stop()
            self._hasher = None
