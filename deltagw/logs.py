"""JSON lines: structlog for our events, one observer for everything.

structlog renders the gateway's own events to JSON (``structlog.twisted``
keeps tracebacks on one escaped line); the observer writes those as they are
and turns every other Twisted log event (start-up, listening, errors from
libraries) into the same shape, so a log shipper only ever sees JSON.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import IO, Any

import orjson
import structlog
import structlog.twisted
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer


def _dumps(document: Any, **_: Any) -> str:
    return orjson.dumps(document, default=str).decode("utf-8")


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


_LEVEL_OF_METHOD = {"msg": "info", "err": "error"}


def _add_level_and_timestamp(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("level", _LEVEL_OF_METHOD.get(method, method))
    event["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return event


def configure_structlog() -> None:
    """Route structlog through Twisted's logging as pre-rendered JSON."""
    structlog.configure(
        processors=[
            _add_level_and_timestamp,
            structlog.twisted.JSONRenderer(serializer=_dumps),
        ],
        logger_factory=structlog.twisted.LoggerFactory(),
        wrapper_class=structlog.twisted.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(**initial: Any) -> Any:
    """A structlog logger (``.msg()`` / ``.err()``) bound to ``initial``."""
    return structlog.get_logger(**initial)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each Twisted log event as one JSON object on one line."""

    def __init__(self, stream: IO[str]) -> None:
        self._write = stream.write
        self._flush = stream.flush

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("_structlog"):
            line = str(event["message"][0])
        else:
            line = _dumps(_plain_event(event))
        self._write(line + "\n")
        self._flush()


def _plain_event(event: dict[str, Any]) -> dict[str, Any]:
    level = event.get("log_level", LogLevel.info)
    document: dict[str, Any] = {
        "event": formatEvent(event) or event.get("log_format") or "",
        "level": getattr(level, "name", str(level)),
        "timestamp": _timestamp(event.get("log_time", 0.0)),
        "system": event.get("log_system", event.get("system", "-")),
    }
    failure = event.get("log_failure")
    if failure is not None:
        document["level"] = "error"
        document["exception"] = failure.getTraceback()
    return document


def observer() -> JSONLinesObserver:
    """The stdout observer; usable as ``twistd --logger=deltagw.logs.observer``."""
    configure_structlog()
    return JSONLinesObserver(sys.stdout)
