"""``--config FILE``: settings from TOML, read at start and again on SIGHUP.

The file uses the environment variables' names (``STORAGE_TIMEOUT = 2.5``).
It sits below the environment and the options (option beats variable beats
file beats default), so an operator's explicit override is never undone by
a reload. A new file is validated as a whole before anything changes; an
invalid one is logged and the running configuration stays.
"""

from __future__ import annotations

import signal
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service

from deltagw.config import SETTINGS, ConfigError, Settings, load_settings
from deltagw.logs import get_logger
from deltagw.process.signals import SignalHandler

_log = get_logger(component="config")
_KNOWN = {setting.env for setting in SETTINGS}


def _as_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise ConfigError(f"{name}: expected a string, number, boolean or list of strings")


def read_config_file(path: str) -> dict[str, str]:
    """The file's settings as environment-style strings.

    Raises:
        ConfigError: unreadable file, invalid TOML, or an unknown setting.
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config={path!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config={path!r}: invalid TOML ({e})") from None
    unknown = sorted(set(document) - _KNOWN)
    if unknown:
        raise ConfigError(f"--config={path!r}: unknown setting(s) {', '.join(unknown)}")
    return {name: _as_text(name, value) for name, value in document.items()}


def settings_with_file(
    environ: Mapping[str, str], options: Mapping[str, Any], path: str | None
) -> Settings:
    """Settings from options, environment and (if given) the config file."""
    layered = {**read_config_file(path), **environ} if path else environ
    return load_settings(layered, options)


RESTART_ONLY = (
    "port", "max_idle_per_host", "idle_upstream_timeout", "breaker_failures", "breaker_reset",
    "retries", "max_in_flight", "shutdown_grace", "upstream_tls_verify", "upstream_ca_file",
    "upstream_client_cert", "upstream_client_key", "speedups",
)
"""Settings a running process cannot change: they shape what it already opened."""


_sighup_held = False


def hold_sighup() -> None:
    """From now until a `ConfigReloader` starts, a SIGHUP is remembered, not fatal.

    The reloader's handler is installed only once the services start; one
    arriving before (a worker's parent forwards them as soon as it has
    spawned the worker) would otherwise end the process, the signal's
    default, or be lost.
    """
    signal.signal(signal.SIGHUP, _hold)


def _hold(signum: int, frame: Any) -> None:
    global _sighup_held
    _sighup_held = True


class ConfigReloader(Service):
    """Re-reads the config file on SIGHUP and hands valid settings on.

    Args:
        reactor: Runs the reload on the reactor thread, not in the handler.
        path: The TOML file.
        environ: The environment (beats the file).
        options: The twistd options (beat everything).
        apply: Called with the new settings when they are valid.
        current: The settings in force, to report what changed.
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        environ: Mapping[str, str],
        options: Mapping[str, Any],
        apply: Callable[[Settings], None],
        current: Settings,
    ) -> None:
        self._reactor = reactor
        self._path = path
        self._environ = dict(environ)
        self._options = dict(options)
        self._apply = apply
        self._current = current
        self._sighup = SignalHandler(reactor, signal.SIGHUP, self.reload)

    def startService(self) -> None:
        global _sighup_held
        super().startService()
        self._sighup.install()
        if _sighup_held:
            _sighup_held = False
            self._reactor.callFromThread(self.reload)

    def stopService(self) -> None:
        super().stopService()
        self._sighup.restore()

    def reload(self) -> bool:
        """Read the file again; apply it if valid. Returns whether it was applied."""
        try:
            settings = settings_with_file(self._environ, self._options, self._path)
        except ConfigError as e:
            _log.msg("config_rejected", path=self._path, reason=str(e), level="error")
            return False
        changed = sorted(
            name for name in Settings.__dataclass_fields__
            if getattr(settings, name) != getattr(self._current, name)
        )
        ignored = [name for name in changed if name in RESTART_ONLY]
        self._apply(settings)
        self._current = settings
        _log.msg("config_reloaded", path=self._path, changed=changed, needs_restart=ignored)
        return True
