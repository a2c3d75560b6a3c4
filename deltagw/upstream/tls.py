"""TLS towards upstreams: verified by default, mutual TLS when configured.

Certificates are checked against the system trust store or UPSTREAM_CA_FILE
(an internal CA), hostnames by service-identity (``optionsForClientTLS``).
Verification can be turned off only explicitly (UPSTREAM_TLS_VERIFY=0), and
the gateway then says so in its log at start.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from deltagw.config import ConfigError, Settings
from deltagw.logs import get_logger

_log = get_logger(component="tls")


@implementer(IPolicyForHTTPS)
class _VerifiedPolicy:
    """Verify the upstream's chain and name; present a client certificate if set."""

    def __init__(self, trust_root: Any, client_certificate: ssl.PrivateCertificate | None) -> None:
        self._trust_root = trust_root
        self._client_certificate = client_certificate

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust_root,
            clientCertificate=self._client_certificate,
        )


@implementer(IPolicyForHTTPS)
class _UnverifiedPolicy:
    """Encrypt without checking who answers (UPSTREAM_TLS_VERIFY=0 only)."""

    def __init__(self, client_certificate: ssl.PrivateCertificate | None) -> None:
        options: dict[str, Any] = {"verify": False}
        if client_certificate is not None:
            options.update(
                privateKey=client_certificate.privateKey.original,
                certificate=client_certificate.original,
            )
        self._options = ssl.CertificateOptions(**options)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self._options


def _read(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{setting}={path!r}: {e.strerror}") from None


def upstream_tls_policy(settings: Settings) -> IPolicyForHTTPS:
    """The HTTPS policy the upstream agent uses.

    Raises:
        ConfigError: a CA, certificate or key file is unreadable or invalid.
    """
    client_certificate = None
    if settings.upstream_client_cert:
        cert = _read(settings.upstream_client_cert, "UPSTREAM_CLIENT_CERT")
        key = _read(settings.upstream_client_key or settings.upstream_client_cert, "UPSTREAM_CLIENT_KEY")
        try:
            client_certificate = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
        except Exception as e:  # pyOpenSSL raises its own Error types
            raise ConfigError(f"UPSTREAM_CLIENT_CERT: not a PEM certificate and key ({e})") from None
    if not settings.upstream_tls_verify:
        _log.msg(
            "upstream_tls_verification_disabled",
            level="warning",
            detail="UPSTREAM_TLS_VERIFY=0: HTTPS upstreams are NOT authenticated",
        )
        return _UnverifiedPolicy(client_certificate)
    if settings.upstream_ca_file:
        pem = _read(settings.upstream_ca_file, "UPSTREAM_CA_FILE")
        try:
            trust_root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem)])
        except Exception as e:
            raise ConfigError(f"UPSTREAM_CA_FILE: not a PEM certificate ({e})") from None
        return _VerifiedPolicy(trust_root, client_certificate)
    if client_certificate is None:
        return BrowserLikePolicyForHTTPS()
    return _VerifiedPolicy(ssl.platformTrust(), client_certificate)
