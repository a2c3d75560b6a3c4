"""JSON log lines are written in batches of whole lines, and never wait long."""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock

from deltagw.logs import BATCH_BYTES, FLUSH_INTERVAL, JSONLinesObserver, LogFlusher
from deltagw.workers import _TaggedLines


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


def test_worker_lines_are_tagged_and_written_in_whole_line_batches() -> None:
    """A worker's batch is tagged line by line and written in writes that stay under PIPE_BUF."""
    stream = CountingStream()
    tagged = _TaggedLines(stream, {"worker": 1, "pid": 4242})
    text = "".join(json.dumps({"event": f"e{i}", "pad": "y" * 60}) + "\n" for i in range(120))
    tagged.write(text + "not json\n")
    writes = stream.flushed
    assert len(writes) > 1 and all(len(w) <= BATCH_BYTES and w.endswith("\n") for w in writes)
    lines = "".join(writes).splitlines()
    assert lines[-1] == "not json"
    documents = [json.loads(line) for line in lines[:-1]]
    assert [d["event"] for d in documents] == [f"e{i}" for i in range(120)]
    assert all(d["worker"] == 1 and d["pid"] == 4242 for d in documents)


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
