"""What the gateway's log says about a run: its answers, and any error it logged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any


def response_outcome(line: str) -> str | None:
    """``"<status> <outcome>"`` of an access-log line; None if it is not JSON."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return f"{event.get('status_code')} {event.get('outcome')}"


def is_error(line: str) -> bool:
    """An error or critical event, or a line of a traceback."""
    return '"level":"error"' in line or '"level":"critical"' in line or "Traceback" in line


def error_summary(line: str) -> str:
    """The last non-blank line of the event's text: for a traceback, the exception."""
    try:
        event = json.loads(line)
        text = str(event.get("event") or event.get("failure") or line)
    except ValueError:
        text = line
    last = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (last[-1] if last else text).strip()[:200]


def scan_gateway_log(path: Path) -> dict[str, Any]:
    """Count the gateway's log lines and its error/critical events, by last line."""
    lines = 0
    size = path.stat().st_size
    errors: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    with open(path, errors="replace") as f:
        for line in f:
            lines += 1
            if '"outgoing_response"' in line:
                outcome = response_outcome(line)
                if outcome is not None:
                    outcomes[outcome] += 1
            if is_error(line):
                errors[error_summary(line)] += 1
    return {"lines": lines, "bytes": size, "errors": dict(errors),
            "responses_by_status_and_outcome": dict(outcomes.most_common())}
