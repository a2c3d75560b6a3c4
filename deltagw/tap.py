"""twistd glue: ``twistd -n deltagw`` options and ``makeService``.

The plugin module (``twisted/plugins/deltagw_plugin.py``) only names this
module, so listing twistd's subcommands never imports the gateway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.application.service import Application, IService
from twisted.python import usage

from deltagw.config import SETTINGS, ConfigError, load_settings
from deltagw.logs import configure_structlog


class Options(usage.Options):
    """Options of ``twistd deltagw``; each also has an environment variable."""

    optParameters = [
        [s.option, None, None, f"{s.help} [env {s.env}, default {s.default}]"]
        for s in SETTINGS
        if s.option
    ]


def service_or_exit(environ: Mapping[str, str], options: Mapping[str, str | None]) -> IService:
    """Build the service; on a bad setting exit with one line naming it."""
    from twisted.internet import reactor

    from deltagw.service import GatewayService

    configure_structlog()
    try:
        return GatewayService(load_settings(environ, options), reactor)
    except ConfigError as e:
        raise SystemExit(f"deltagw: configuration error: {e}") from None


def makeService(options: Options) -> IService:
    """Build the gateway service tree from parsed options."""
    return service_or_exit(os.environ, dict(options))


def make_application(environ: Mapping[str, str]) -> Application:
    """The application ``gateway.tac`` runs, configured from the environment."""
    application = Application("deltagw")
    service_or_exit(environ, {}).setServiceParent(application)
    return application
