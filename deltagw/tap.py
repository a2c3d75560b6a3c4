"""twistd glue: ``twistd -n deltagw`` options and ``makeService``.

The plugin module (``twisted/plugins/deltagw_plugin.py``) only names this
module, so listing twistd's subcommands never imports the gateway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from twisted.application.service import Application, IService
from twisted.python import usage

from deltagw import __version__
from deltagw.config import SETTINGS, ConfigError
from deltagw.logs import configure_structlog, get_logger, log_stream, set_least_level


class Options(usage.Options):
    """Options of ``twistd deltagw``; each also has an environment variable."""

    optFlags = [
        ["demo", None, "Also run the reference auth, storage and analytics services "
                       "on loopback and point the gateway at them."],
    ]
    optParameters = [
        [s.option, None, None, f"{s.help} [env {s.env}, default {s.default}]"]
        for s in SETTINGS
        if s.option
    ] + [
        ["demo-state", None, None,
         "Directory for the demo's users, revocations and secret "
         "[default $XDG_STATE_HOME/deltagw or ~/.local/state/deltagw]."],
        ["config", None, None,
         "TOML file of settings (named like the environment variables, which "
         "beat it); read again on SIGHUP."],
    ]


    def opt_version(self) -> None:
        """Print the version of deltagw (and of what runs it), and exit."""
        print(version_line())
        raise SystemExit(0)


def version_line() -> str:
    """``deltagw 0.1.0 (Twisted 26.10.0, Python 3.11.7)``."""
    import platform

    import twisted

    return f"deltagw {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"


def service_or_exit(
    environ: Mapping[str, str],
    options: Mapping[str, Any],
    demo_state: str | None = None,
    twistd_options: Mapping[str, Any] | None = None,
) -> IService:
    """Build the service tree; on a bad setting exit with one line naming it.

    With ``demo_state`` the reference backends start first (their ports are
    bound here, so their URLs are known) and the gateway points at them,
    also after a reload. With a config file, SIGHUP re-reads it.
    """
    from twisted.internet import reactor

    from deltagw.process.cache_purge import (
        PurgeOnSignal,
        ignore_purges_until_started,
        purge_every_worker,
    )
    from deltagw.process.reload import ConfigReloader, hold_sighup, settings_with_file
    from deltagw.service import GatewayService, RootService

    ignore_purges_until_started()
    configure_structlog()
    root = RootService(reactor, log_stream(twistd_options or {}))
    config_file = options.get("config")
    if config_file:
        hold_sighup()
    try:
        settings = settings_with_file(environ, options, config_file)
        set_least_level(settings.log_level)
        pinned: dict[str, Any] = {}
        if demo_state is not None:
            from deltagw.demo.platform import DemoPlatform

            demo = DemoPlatform(reactor, demo_state, environ=environ)
            demo.privilegedStartService()
            demo.setServiceParent(root)
            pinned = {f"{name}_url": url for name, url in demo.urls.items()}
            settings = replace(settings, **pinned)
        if settings.workers > 1:
            from deltagw.process.workers import WorkerSupervisor

            WorkerSupervisor(
                settings, reactor, environ, options, pinned=pinned
            ).setServiceParent(root)
            return root
        gateway = GatewayService(settings, reactor, purge_every_worker(environ))
        gateway.setServiceParent(root)
        PurgeOnSignal(reactor, gateway.purge_cache).setServiceParent(root)
        if demo_state is not None:
            gateway.listening().addCallback(_announce_demo, settings.port.startswith("ssl:"))
    except ConfigError as e:
        raise SystemExit(f"deltagw: configuration error: {e}") from None
    if config_file:
        ConfigReloader(
            reactor,
            config_file,
            environ,
            options,
            lambda new: gateway.apply_settings(replace(new, **pinned)),
            settings,
        ).setServiceParent(root)
    return root


def _announce_demo(port: Any, secure: bool) -> None:
    """One line a newcomer can read among the JSON: where the platform is."""
    address = port.getHost()
    host = "localhost" if address.host in ("127.0.0.1", "0.0.0.0", "::", "::1") else address.host
    url = f"{'https' if secure else 'http'}://{host}:{address.port}"
    get_logger(component="demo").msg(
        f"DeltaStream is ready at {url} - API docs: {url}/api/docs/ui", url=url
    )


def makeService(options: Options) -> IService:
    """Build the gateway service tree from parsed options."""
    demo_state = None
    if options["demo"]:
        from deltagw.demo.platform import default_state_dir

        demo_state = options["demo-state"] or default_state_dir()
    # twistd's own options (--logfile, --syslog, --nodaemon): this
    # subcommand's parent.
    return service_or_exit(os.environ, dict(options), demo_state, getattr(options, "parent", None))


def make_application(environ: Mapping[str, str]) -> Application:
    """The application ``gateway.tac`` runs, configured from the environment."""
    application = Application("deltagw")
    service_or_exit(environ, {}).setServiceParent(application)
    return application
