"""`LineLogger` writes exactly what structlog, as the gateway configures it, writes."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from deltagw import logs

FIELDS: list[dict[str, Any]] = [
    {},
    {"method": "GET", "path": "/api/data/x", "client": "127.0.0.1", "trace_id": "ab"},
    {"level": "warning", "status_code": 503, "latency_ms": 1.25, "route": None, "cache": "miss"},
    {"timestamp": "mine", "pid": 7, "component": "other", "payload": b"bytes", "obj": object},
]


def _published(monkeypatch: pytest.MonkeyPatch, log: Any, event: str, fields: dict) -> list:
    """The events ``log.msg(event, **fields)`` hands to Twisted's observers, times fixed."""
    monkeypatch.setattr(logs.time, "time", lambda: 1.5)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        log.msg(event, **fields)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    return [{**e, "message": tuple(str(m) for m in e["message"]),
             "log_text": str(e["log_text"])} for e in seen]


@pytest.mark.parametrize("fields", FIELDS)
def test_line_logger_writes_the_structlog_line(monkeypatch: pytest.MonkeyPatch, fields) -> None:
    """Same line, field for field and in the same order, and the same event for observers."""
    monkeypatch.setattr(logs, "_every_line", {"worker": 1, "pid": 4242})
    logs.configure_structlog()
    ours = _published(monkeypatch, logs.LineLogger(component="access"), "outgoing_response",
                      fields)
    theirs = _published(monkeypatch, logs.get_logger(component="access"), "outgoing_response",
                        fields)
    assert ours == theirs
    assert len(ours) == 1


def test_line_logger_drops_lines_below_the_least_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under LOG_LEVEL=warning an info line is not written; a warning one is."""
    monkeypatch.setattr(logs, "_least_level", logs.LEVELS["warning"])
    logger = logs.LineLogger(component="access")
    assert _published(monkeypatch, logger, "incoming_request", {}) == []
    assert len(_published(monkeypatch, logger, "x", {"level": "warning"})) == 1
