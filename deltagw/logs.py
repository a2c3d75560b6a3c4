"""JSON lines: structlog for our events, one observer for everything.

structlog renders the gateway's own events to JSON (``structlog.twisted``
keeps tracebacks on one escaped line); the observer writes those as they are
and turns every other Twisted log event (start-up, listening, errors from
libraries) into the same shape, so a log shipper only ever sees JSON.
"""

from __future__ import annotations

import atexit
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, Any
from weakref import WeakSet

import orjson
import structlog
import structlog.twisted
from twisted.application.internet import TimerService
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.logfile import LogFile
from zope.interface import implementer


def _dumps(document: Any, **_: Any) -> str:
    return orjson.dumps(document, default=str).decode("utf-8")


_this_second: tuple[int, str] = (-1, "")


def _timestamp(seconds: float) -> str:
    """``seconds`` as ``isoformat(timespec="milliseconds")`` in UTC writes it.

    The date and time of day are formatted once a second, not for each
    request's line.
    """
    global _this_second
    second = int(seconds)
    if second != _this_second[0]:
        text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _this_second = (second, text)
    return "%s.%03d+00:00" % (_this_second[1], int((seconds - second) * 1000))


def _now() -> str:
    return _timestamp(time.time())


_LEVEL_OF_METHOD = {"msg": "info", "err": "error"}


_every_line: dict[str, Any] = {}
"""Fields every line of this process carries (`add_to_every_line`)."""


def add_to_every_line(fields: Mapping[str, Any]) -> None:
    """Give every JSON line this process writes these fields (a worker's slot
    and pid), unless the event has its own."""
    _every_line.update(fields)


LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
"""The levels of a line, in order (LOG_LEVEL names the least one written)."""

_least_level = LEVELS["info"]


def set_least_level(name: str) -> None:
    """Write only lines of level ``name`` or above (LOG_LEVEL)."""
    global _least_level
    _least_level = LEVELS[name]


def is_written(level: str) -> bool:
    """Whether a line of ``level`` would be written: asked before making a
    line's fields costs anything, for a level most deployments leave out."""
    return LEVELS[level] >= _least_level


def _add_level_and_timestamp(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    level = event.setdefault("level", _LEVEL_OF_METHOD.get(method, method))
    if LEVELS.get(level, 20) < _least_level:
        raise structlog.DropEvent
    event["timestamp"] = _now()
    for key, value in _every_line.items():
        event.setdefault(key, value)
    return event


class _Publisher:
    """What structlog's Twisted ``BoundLogger`` writes to: Twisted's logging.

    Events go straight to the ``twisted.logger`` publisher, in the shape
    ``twisted.python.log`` would give them, without that legacy module's
    lock, context copy and conversion (an event for every request; see
    ``make bench``). Every observer still sees every event.
    """

    def msg(self, *message: Any, **fields: Any) -> None:
        _publish(message, fields, LogLevel.info, 0, time.time())

    def err(self, _stuff: Any = None, _why: Any = None, **fields: Any) -> None:
        # structlog's JSONRenderer has already rendered any failure into the line.
        _publish((repr(_stuff),), fields, LogLevel.critical, 1, time.time())


def _publish(
    message: tuple[Any, ...], fields: dict[str, Any], level: LogLevel, error: int, now: float
) -> None:
    globalLogPublisher({
        "message": message,
        "time": now,
        "log_time": now,
        "log_level": level,
        "isError": error,
        "system": "-",
        "log_system": "-",
        "log_namespace": "deltagw",
        "log_format": "{log_text}",
        "log_text": message[0] if message else "",
        **fields,
    })


_PUBLISHER = _Publisher()


def configure_structlog() -> None:
    """Route structlog through Twisted's logging as pre-rendered JSON."""
    structlog.configure(
        processors=[
            _add_level_and_timestamp,
            structlog.twisted.JSONRenderer(serializer=_dumps),
        ],
        logger_factory=lambda *_: _PUBLISHER,
        wrapper_class=structlog.twisted.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(**initial: Any) -> Any:
    """A structlog logger (``.msg()`` / ``.err()``) bound to ``initial``."""
    return structlog.get_logger(**initial)


class LineLogger:
    """Writes the line `configure_structlog`'s chain writes, without structlog's machinery.

    For the events written for every request (``outgoing_response``, and
    ``incoming_request`` under LOG_LEVEL=debug): structlog's bound logger copies its context,
    runs each processor in turn and checks what the last one returned,
    which cost more than rendering the line itself (``make bench``). The
    fields come out in the same order as structlog's (bound fields, the
    event's own, level, timestamp, the process's, ``event`` last) and
    observers get the same event, so nothing downstream can tell them apart.

    Args:
        initial: Fields every line of this logger starts with (``component``).
    """

    def __init__(self, **initial: Any) -> None:
        self._initial = initial

    def msg(self, event: str, **fields: Any) -> None:
        """Log ``event`` (a name, never a failure) with ``fields`` at their ``level`` (info)."""
        document = {**self._initial, **fields}
        if LEVELS.get(document.setdefault("level", "info"), 20) < _least_level:
            return
        now = time.time()
        document["timestamp"] = _timestamp(now)
        for key, value in _every_line.items():
            document.setdefault(key, value)
        document["event"] = event
        _publish((structlog.twisted.ReprWrapper(_dumps(document)),), _RENDERED, LogLevel.info, 0,
                 now)


_RENDERED = {"_structlog": True}
"""Marks an event whose first message is its whole JSON line (`JSONLinesObserver`)."""


BATCH_BYTES = 4000
"""Lines are written in batches of at most this many bytes (unless one line
is longer): under PIPE_BUF (4096), so each batch is one atomic write and the
lines of several processes sharing one stdout pipe never interleave."""

FLUSH_INTERVAL = 0.05
"""Seconds a line may wait for its batch (`LogFlusher`)."""

_observers: WeakSet[JSONLinesObserver] = WeakSet()
_batching = True
"""Whether lines wait for their batch (until the process starts stopping)."""


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each Twisted log event as one JSON object on one line.

    Lines go out in batches of whole lines, when a batch is full and from
    `flush_all` (every FLUSH_INTERVAL while serving, and at exit): a write
    and a flush per line were two system calls for every request's access
    line (``make bench``).
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._size = 0
        _observers.add(self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("_structlog"):
            line = str(event["message"][0])
        else:
            document = _plain_event(event)
            if LEVELS.get(document["level"], 20) < _least_level:
                return
            line = _dumps(document)
        if self._size + len(line) >= BATCH_BYTES:
            self.flush()
        self._lines.append(line + "\n")
        self._size += len(line) + 1
        if not _batching:
            self.flush()

    def flush(self) -> None:
        """Write the lines waiting in the batch."""
        if self._lines:
            text = "".join(self._lines)
            self._lines = []
            self._size = 0
            self._stream.write(text)
            self._stream.flush()


def flush_all() -> None:
    """Write what every observer holds (called by `LogFlusher` and at exit)."""
    for observer in list(_observers):
        observer.flush()


atexit.register(flush_all)


class LogFlusher(TimerService):
    """Writes waiting log lines every FLUSH_INTERVAL, and once more on stop."""

    def __init__(self, reactor: Any, interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(interval, flush_all)
        self.clock = reactor

    def stopService(self) -> Any:
        """Flush, and write each line at once from now on.

        The process is stopping: twistd logs its last lines after the
        reactor has stopped, and a process ended by SIGINT re-raises the
        signal, so no exit handler would write a batch they waited in.
        """
        global _batching
        result = super().stopService()
        _batching = False
        flush_all()
        return result


def _plain_event(event: dict[str, Any]) -> dict[str, Any]:
    level = event.get("log_level", LogLevel.info)
    document: dict[str, Any] = {
        "event": formatEvent(event) or event.get("log_format") or "",
        "level": "warning" if level is LogLevel.warn else getattr(level, "name", str(level)),
        "timestamp": _timestamp(event.get("log_time", 0.0)),
        "system": event.get("log_system", event.get("system", "-")),
    }
    for key, value in _every_line.items():
        document.setdefault(key, value)
    failure = event.get("log_failure")
    if failure is not None:
        document["level"] = "error"
        document["exception"] = failure.getTraceback()
    return document


def observer(stream: IO[str] | None = None) -> JSONLinesObserver:
    """The observer writing to ``stream`` (stdout by default); usable as
    ``twistd --logger=deltagw.logs.observer``."""
    configure_structlog()
    return JSONLinesObserver(sys.stdout if stream is None else stream)


def log_stream(twistd_options: Mapping[str, Any]) -> IO[str] | None:
    """Where twistd's own options say the log goes: None for stdout, else a file.

    As twistd would: ``--logfile=PATH`` (rotated by size like twistd's own),
    and ``twistd.log`` for a daemon without one (its stdout is gone).

    Raises:
        SystemExit: ``--syslog``, which would turn JSON lines into syslog
            text; under systemd, journald collects stdout.
    """
    if twistd_options.get("syslog"):
        raise SystemExit(
            "deltagw: --syslog is not supported: deltagw writes JSON lines to stdout "
            "(journald collects them under systemd) or to --logfile"
        )
    path = twistd_options.get("logfile")
    if path == "-" or (not path and twistd_options.get("nodaemon", True)):
        return None
    return LogFile.fromFullPath(path or "twistd.log")  # type: ignore[return-value]
