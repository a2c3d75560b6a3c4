"""The service tree twistd runs: one listening site and the upstream pool."""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from deltagw.app import Gateway
from deltagw.auth import CachingVerifier, LocalVerifier, RemoteVerifier, Verifier
from deltagw.authentication import Authenticator
from deltagw.config import ConfigError, Settings
from deltagw.limits import RateLimits
from deltagw.logs import observer
from deltagw.proxy import Proxy, UpstreamClient
from deltagw.site import GatewaySite
from deltagw.systemd import SystemdNotifier


def make_verifier(settings: Settings, reactor: Any, http: HTTPClient) -> Verifier:
    """The token verifier the settings ask for, behind the verification cache.

    Local verification (JWT_SECRET or JWT_PUBLIC_KEY_FILE) trades central
    revocation for speed; otherwise the auth service is asked.

    Raises:
        ConfigError: the key for local verification is unusable.
    """
    inner: Verifier
    if settings.jwt_secret:
        inner = LocalVerifier.from_secret(settings.jwt_secret, reactor=reactor)
    elif settings.jwt_public_key_file:
        try:
            inner = LocalVerifier.from_public_key_file(
                settings.jwt_public_key_file, reactor=reactor
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"JWT_PUBLIC_KEY_FILE={settings.jwt_public_key_file!r}: {e}") from None
    else:
        inner = RemoteVerifier(http, settings.auth_url, settings.verify_timeout, reactor)
    return CachingVerifier(inner, reactor, ttl=settings.verify_cache_ttl)


class GatewayService(MultiService):
    """The whole gateway: whatever it opens on start it closes on stop.

    Args:
        settings: The validated configuration.
        reactor: The reactor to listen and time on.
    """

    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.client = UpstreamClient(
            reactor, settings.max_idle_per_host, settings.idle_upstream_timeout
        )
        authenticator = Authenticator(
            make_verifier(settings, reactor, self.client.http), settings.require_auth
        )
        self.limits = RateLimits(settings, reactor)
        self.limits.setServiceParent(self)
        self.gateway = Gateway(
            settings, reactor, Proxy(reactor, self.client), authenticator, self.limits
        )
        self.site = GatewaySite(self.gateway.resource(), settings, reactor)
        self.listener = StreamServerEndpointService(
            serverFromString(reactor, settings.port), self.site
        )
        # A port that cannot be bound must stop start-up, not just log.
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self)
        # After the listener: READY=1 once it listens; MultiService stops
        # children in reverse, so STOPPING=1 goes out before the port closes.
        self.notifier = SystemdNotifier(reactor, ready=self.listening)
        self.notifier.setServiceParent(self)

    def listening(self) -> defer.Deferred[Any]:
        """Fires with the listening port once the service has started."""
        return self.listener._waitingForPort

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        yield self.client.close()


class RootService(MultiService):
    """The top of the tree twistd runs: the gateway, and the demo backends
    when asked for."""

    def setServiceParent(self, parent: IServiceCollection) -> None:
        """Also make JSON lines the application's log format under twistd.

        twistd asks the application for an ILogObserver component unless
        ``--logger`` was given, so ``twistd -n deltagw`` logs JSON without
        extra flags.
        """
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, observer())
        super().setServiceParent(parent)
