"""JSON log lines are written in batches of whole lines, and never wait long."""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock

from deltagw.logs import BATCH_BYTES, FLUSH_INTERVAL, JSONLinesObserver, LogFlusher


class CountingStream(io.StringIO):
    """A text stream that remembers what each flush wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []
        self._mark = 0

    def flush(self) -> None:
        self.flushed.append(self.getvalue()[self._mark:])
        self._mark = len(self.getvalue())


def _event(text: str) -> dict:
    return {"_structlog": True, "message": (json.dumps({"event": text}),)}


def test_lines_wait_for_the_flusher_then_leave_in_one_write() -> None:
    """Lines are held until the flusher's next tick, then written together with one flush."""
    clock = Clock()
    stream = CountingStream()
    observer = JSONLinesObserver(stream)
    flusher = LogFlusher(clock)
    flusher.startService()
    observer(_event("a"))
    observer(_event("b"))
    assert stream.getvalue() == ""
    clock.advance(FLUSH_INTERVAL)
    assert stream.flushed == ['{"event": "a"}\n{"event": "b"}\n']
    observer(_event("c"))
    flusher.stopService()
    assert stream.flushed[-1] == '{"event": "c"}\n'


def test_a_full_batch_is_written_at_once_in_whole_lines() -> None:
    """Past BATCH_BYTES the held lines go out without waiting, each write under PIPE_BUF."""
    stream = CountingStream()
    observer = JSONLinesObserver(stream)
    for i in range(200):
        observer(_event(f"line {i:03d} " + "x" * 40))
    assert stream.flushed, "a full batch should not wait for the flusher"
    assert all(len(w) <= BATCH_BYTES and w.endswith("\n") for w in stream.flushed)
    observer.flush()
    lines = "".join(stream.flushed).splitlines()
    assert [json.loads(line)["event"][:8] for line in lines] == [f"line {i:03d}" for i in range(200)]


def test_every_line_carries_the_process_fields(monkeypatch) -> None:
    """A worker's fields go on its structlog lines and on Twisted's own, unless a line has its own."""
    from twisted.logger import LogLevel

    from deltagw import logs

    monkeypatch.setattr(logs, "_every_line", {})
    logs.add_to_every_line({"worker": 1, "pid": 4242})
    rendered = logs._add_level_and_timestamp(None, "msg", {"event": "x", "pid": 7})
    assert (rendered["worker"], rendered["pid"]) == (1, 7)
    stream = CountingStream()
    observer = JSONLinesObserver(stream)
    observer({"log_format": "started", "log_level": LogLevel.info, "log_time": 0.0})
    observer.flush()
    assert json.loads(stream.getvalue())["worker"] == 1
    assert json.loads(stream.getvalue())["pid"] == 4242


def test_timestamps_match_isoformat() -> None:
    """The cached-second timestamp reads exactly as datetime's isoformat in milliseconds."""
    from datetime import datetime, timezone

    from deltagw import logs

    for _ in range(3):
        before = datetime.now(timezone.utc).replace(microsecond=0)
        stamp = logs._now()
        after = datetime.now(timezone.utc)
        parsed = datetime.fromisoformat(stamp)
        assert before <= parsed <= after
        assert stamp == parsed.isoformat(timespec="milliseconds")
