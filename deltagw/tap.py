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

from deltagw.config import SETTINGS, ConfigError, load_settings
from deltagw.logs import configure_structlog


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
    ]


def service_or_exit(
    environ: Mapping[str, str], options: Mapping[str, Any], demo_state: str | None = None
) -> IService:
    """Build the service tree; on a bad setting exit with one line naming it.

    With ``demo_state`` the reference backends start first (their ports are
    bound here, so their URLs are known) and the gateway points at them.
    """
    from twisted.internet import reactor

    from deltagw.service import GatewayService, RootService

    configure_structlog()
    root = RootService()
    try:
        settings = load_settings(environ, options)
        if demo_state is not None:
            from deltagw.demo.platform import DemoPlatform

            demo = DemoPlatform(reactor, demo_state, environ=environ)
            demo.privilegedStartService()
            demo.setServiceParent(root)
            settings = replace(
                settings,
                auth_url=demo.urls["auth"],
                storage_url=demo.urls["storage"],
                analytics_url=demo.urls["analytics"],
            )
        GatewayService(settings, reactor).setServiceParent(root)
    except ConfigError as e:
        raise SystemExit(f"deltagw: configuration error: {e}") from None
    return root


def makeService(options: Options) -> IService:
    """Build the gateway service tree from parsed options."""
    demo_state = None
    if options["demo"]:
        from deltagw.demo.platform import default_state_dir

        demo_state = options["demo-state"] or default_state_dir()
    return service_or_exit(os.environ, dict(options), demo_state)


def make_application(environ: Mapping[str, str]) -> Application:
    """The application ``gateway.tac`` runs, configured from the environment."""
    application = Application("deltagw")
    service_or_exit(environ, {}).setServiceParent(application)
    return application
