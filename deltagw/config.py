"""Settings: read once from options and the environment, validated, frozen.

Every setting has an environment variable (the seed deployments use them);
the common ones also have a twistd option. Option beats variable beats
default. A bad value raises ``ConfigError`` whose one-line message names the
setting, so start-up stops before anything listens.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.endpoints import serverFromString

from deltagw.logs import LEVELS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
"""An address range, as TRUSTED_PROXIES, METRICS_ALLOW and ADMIN_ALLOW list them."""

GUARDABLE_GROUPS = frozenset({"data", "analytics"})
"""Route groups that REQUIRE_AUTH may put behind a token."""


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with."""


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("expected a positive number of seconds")
    return value


def _non_negative_seconds(text: str) -> float:
    value = float(text)
    if value < 0 or value != value or value == float("inf"):
        raise ValueError("expected a number of seconds, 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("expected a whole number above 0")
    return value


def _ipv6_prefix(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 128:
        raise ValueError("expected a prefix length from 1 to 128")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expected a whole number, 0 or more")
    return value


def _microseconds(text: str) -> int:
    value = _non_negative_int(text)
    if value > 1000:
        raise ValueError("expected at most 1000 (microseconds)")
    return value


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("expected a base URL without query or fragment")
    return text.rstrip("/")


def _public_url(text: str) -> str | None:
    """Where clients reach the gateway (``https://api.example.com``), or None."""
    if not text.strip():
        return None
    url = _url(text.strip())
    if urlsplit(url).path:
        raise ValueError("expected a URL without a path, such as https://api.example.com")
    return url


class _NoReactor:
    """Stands in for the reactor while an endpoint string is only parsed.

    Building an endpoint object parses the description (and loads TLS keys)
    without touching the reactor, which may not be chosen yet while options
    are parsed.
    """


DEFAULT_BACKLOG = 1024
"""Listen backlog for a plain port number: Twisted's default of 50 drops
SYNs (a one-second client stall) as soon as a burst of clients connects."""


def _endpoint(text: str) -> str:
    description = f"tcp:{text}:backlog={DEFAULT_BACKLOG}" if text.isdigit() else text
    if text.isdigit() and not 0 < int(text) < 65536:
        raise ValueError("expected a port number from 1 to 65535")
    try:
        serverFromString(_NoReactor(), description)
    except Exception as e:  # the parsers raise many unrelated types
        raise ValueError(f"not a Twisted server endpoint ({e})") from None
    return description


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("expected '*' or a comma-separated list of origins")
    if "*" in origins and len(origins) > 1:
        raise ValueError("'*' cannot be combined with other origins")
    return origins


def _networks(text: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs or addresses (a bare address is a /32 or /128)."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False)
        for part in text.split(",")
        if part.strip()
    )


def _groups(text: str) -> frozenset[str]:
    groups = frozenset(g.strip() for g in text.split(",") if g.strip())
    unknown = groups - GUARDABLE_GROUPS
    if unknown:
        raise ValueError(f"unknown route group(s) {', '.join(sorted(unknown))}; "
                         f"expected some of {', '.join(sorted(GUARDABLE_GROUPS))}")
    return groups


def _group_seconds(text: str) -> tuple[tuple[str, float], ...]:
    """``data:1,analytics:2``: seconds by route group (CACHE_TTL)."""
    ttls: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        group, colon, seconds = part.partition(":")
        if not colon or group.strip() not in GUARDABLE_GROUPS:
            raise ValueError(f"expected group:seconds with a group among "
                             f"{', '.join(sorted(GUARDABLE_GROUPS))}, got {part!r}")
        ttls[group.strip()] = _seconds(seconds.strip())
    return tuple(sorted(ttls.items()))


def _optional_text(text: str) -> str | None:
    return text.strip() or None


def _server_field(text: str) -> bytes | None:
    """A Server field value (RFC 9110 §10.2.4), or None to send none."""
    value = text.strip()
    if not value:
        return None
    if not all(" " <= c <= "~" for c in value):
        raise ValueError("expected printable ASCII, such as deltagw")
    return value.encode("ascii")


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LEVELS:
        raise ValueError(f"expected one of {', '.join(LEVELS)}")
    return level


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _redis_url(text: str) -> str | None:
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme == "unix" and parts.path:
        return text
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("expected redis://[:password@]host[:port][/db] or unix:///path")
    try:
        parts.port
        int(parts.path.strip("/") or 0)
    except ValueError:
        raise ValueError("expected redis://[:password@]host[:port][/db]") from None
    return text


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


@dataclass(frozen=True)
class Setting:
    """How one setting is named, defaulted and parsed."""

    field: str
    env: str
    default: str
    parse: Callable[[str], Any]
    option: str | None = None
    help: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting("port", "PORT", "8000", _endpoint, "port",
            "Port number or Twisted endpoint (tcp:8000:interface=127.0.0.1, ssl:..., systemd:...)."),
    Setting("public_url", "PUBLIC_URL", "", _public_url),
    Setting("service_name", "SERVICE_NAME", "api-gateway", _text, "service-name",
            "Name reported by /health."),
    Setting("auth_url", "AUTH_SERVICE_URL", "http://auth:8001", _url, "auth-url",
            "Base URL of the auth service."),
    Setting("storage_url", "STORAGE_SERVICE_URL", "http://storage:8003", _url, "storage-url",
            "Base URL of the storage service."),
    Setting("analytics_url", "ANALYTICS_SERVICE_URL", "http://analytics:8004", _url,
            "analytics-url", "Base URL of the analytics service."),
    Setting("auth_timeout", "AUTH_TIMEOUT", "10", _seconds),
    Setting("storage_timeout", "STORAGE_TIMEOUT", "10", _seconds),
    Setting("analytics_timeout", "ANALYTICS_TIMEOUT", "30", _seconds),
    Setting("verify_timeout", "VERIFY_TIMEOUT", "5", _seconds),
    Setting("cors_origins", "CORS_ORIGINS", "*", _origins),
    Setting("max_body_bytes", "MAX_BODY_BYTES", "1048576", _non_negative_int),
    Setting("trusted_proxies", "TRUSTED_PROXIES", "", _networks),
    Setting("require_auth", "REQUIRE_AUTH", "", _groups),
    Setting("verify_cache_ttl", "VERIFY_CACHE_TTL", "10", _non_negative_seconds),
    Setting("jwt_secret", "JWT_SECRET", "", _optional_text),
    Setting("jwt_public_key_file", "JWT_PUBLIC_KEY_FILE", "", _optional_text),
    Setting("rate_limit_requests", "RATE_LIMIT_REQUESTS", "100", _non_negative_int),
    Setting("rate_limit_window", "RATE_LIMIT_WINDOW", "60", _seconds),
    Setting("rate_limit_auth_requests", "RATE_LIMIT_AUTH_REQUESTS", "10", _non_negative_int),
    Setting("rate_limit_auth_window", "RATE_LIMIT_AUTH_WINDOW", "60", _seconds),
    Setting("rate_limit_max_keys", "RATE_LIMIT_MAX_KEYS", "100000", _positive_int),
    Setting("rate_limit_ipv6_prefix", "RATE_LIMIT_IPV6_PREFIX", "64", _ipv6_prefix),
    Setting("rate_limit_fail_closed", "RATE_LIMIT_FAIL_CLOSED", "0", _flag),
    Setting("redis_url", "REDIS_URL", "", _redis_url),
    Setting("client_timeout", "CLIENT_TIMEOUT", "60", _seconds),
    Setting("max_idle_per_host", "UPSTREAM_MAX_IDLE_PER_HOST", "64", _positive_int),
    Setting("idle_upstream_timeout", "UPSTREAM_IDLE_TIMEOUT", "60", _seconds),
    Setting("breaker_failures", "BREAKER_FAILURES", "5", _positive_int),
    Setting("breaker_reset", "BREAKER_RESET", "30", _seconds),
    Setting("retries", "RETRIES", "1", _non_negative_int),
    Setting("max_in_flight", "MAX_IN_FLIGHT", "256", _positive_int),
    Setting("busy_poll_us", "BUSY_POLL_US", "0", _microseconds),
    Setting("speedups", "SPEEDUPS", "1", _flag),
    Setting("shutdown_grace", "SHUTDOWN_GRACE", "10", _non_negative_seconds),
    Setting("metrics_allow", "METRICS_ALLOW", "", _networks),
    Setting("admin_allow", "ADMIN_ALLOW", "127.0.0.0/8,::1", _networks),
    Setting("log_level", "LOG_LEVEL", "info", _log_level),
    Setting("server_field", "SERVER_HEADER", "deltagw", _server_field),
    Setting("upstream_tls_verify", "UPSTREAM_TLS_VERIFY", "1", _flag),
    Setting("upstream_ca_file", "UPSTREAM_CA_FILE", "", _optional_text),
    Setting("upstream_client_cert", "UPSTREAM_CLIENT_CERT", "", _optional_text),
    Setting("upstream_client_key", "UPSTREAM_CLIENT_KEY", "", _optional_text),
    Setting("cache", "CACHE", "1", _flag),
    Setting("cache_max_bytes", "CACHE_MAX_BYTES", str(64 * 1024 * 1024), _positive_int),
    Setting("cache_max_entry_bytes", "CACHE_MAX_ENTRY_BYTES", str(1024 * 1024), _positive_int),
    Setting("cache_ttl", "CACHE_TTL", "", _group_seconds),
    Setting("cache_stale_if_error", "CACHE_STALE_IF_ERROR", "0", _non_negative_seconds),
    Setting("workers", "WORKERS", "1", _positive_int, "workers",
            "Worker processes serving PORT (more than 1: a parent binds it once and "
            "supervises them)."),
)


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one gateway process.

    ``port`` holds a full endpoint description (``tcp:8000``); timeouts are
    seconds; ``trusted_proxies`` holds parsed networks.
    """

    port: str
    public_url: str | None
    service_name: str
    auth_url: str
    storage_url: str
    analytics_url: str
    auth_timeout: float
    storage_timeout: float
    analytics_timeout: float
    verify_timeout: float
    cors_origins: tuple[str, ...]
    max_body_bytes: int
    trusted_proxies: tuple[Network, ...]
    require_auth: frozenset[str]
    verify_cache_ttl: float
    jwt_secret: str | None
    jwt_public_key_file: str | None
    rate_limit_requests: int
    rate_limit_window: float
    rate_limit_auth_requests: int
    rate_limit_auth_window: float
    rate_limit_max_keys: int
    rate_limit_ipv6_prefix: int
    rate_limit_fail_closed: bool
    redis_url: str | None
    client_timeout: float
    max_idle_per_host: int
    idle_upstream_timeout: float
    breaker_failures: int
    breaker_reset: float
    retries: int
    max_in_flight: int
    busy_poll_us: int
    speedups: bool
    shutdown_grace: float
    metrics_allow: tuple[Network, ...]
    admin_allow: tuple[Network, ...]
    log_level: str
    server_field: bytes | None
    upstream_tls_verify: bool
    upstream_ca_file: str | None
    upstream_client_cert: str | None
    upstream_client_key: str | None
    cache: bool
    cache_max_bytes: int
    cache_max_entry_bytes: int
    cache_ttl: tuple[tuple[str, float], ...]
    cache_stale_if_error: float
    workers: int

    def upstream_url(self, service: str) -> str:
        """The base URL of a service named in the route table."""
        return getattr(self, f"{service}_url")

    def upstream_timeout(self, service: str) -> float:
        """The timeout of a service named in the route table."""
        return getattr(self, f"{service}_timeout")


assert {s.field for s in SETTINGS} == {f.name for f in fields(Settings)}


def load_settings(
    environ: Mapping[str, str], options: Mapping[str, str | None] | None = None
) -> Settings:
    """Build the settings from twistd options and the environment.

    Args:
        environ: The process environment (``os.environ``).
        options: Option values by option name; ``None`` means "not given".

    Raises:
        ConfigError: naming the first setting whose value is unusable.
    """
    options = options or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        given = options.get(setting.option) if setting.option else None
        source = f"--{setting.option}" if given is not None else setting.env
        raw = given if given is not None else environ.get(setting.env, setting.default)
        try:
            values[setting.field] = setting.parse(raw.strip())
        except ValueError as e:
            raise ConfigError(f"{source}={raw!r}: {e}") from None
    # An answer larger than the whole cache could never be kept: a smaller
    # CACHE_MAX_BYTES alone makes the cache smaller, with no second setting.
    values["cache_max_entry_bytes"] = min(values["cache_max_entry_bytes"],
                                          values["cache_max_bytes"])
    return Settings(**values)
