"""The two JSON bodies nginx serves, and the check that the gateway relays them intact.

The bodies are deterministic so that every run (and every commit) loads the
same bytes: a ~600-byte quote and an option chain just under 20 KB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from harness.locations import LOOPBACK
from harness.polling import http_get

# (path on nginx, path through the gateway) of each body.
BODY_PATHS = (("/underlying/NIFTY", "/api/data/underlying/NIFTY"),
              ("/option/chain/NIFTY", "/api/data/chain/NIFTY"))


def compact_json(doc: dict[str, Any]) -> str:
    """JSON without spaces: the sizes below are counted on this form."""
    return json.dumps(doc, separators=(",", ":"))


def underlying_body() -> bytes:
    """A deterministic ~600-byte quote of the NIFTY index."""
    doc = {
        "product": "NIFTY",
        "exchange": "NSE",
        "timestamp": "2024-01-15T10:15:00+05:30",
        "ltp": 21894.55, "open": 21773.7, "high": 21928.25, "low": 21715.15,
        "close": 21710.8, "change": 183.75, "change_pct": 0.85,
        "vwap": 21852.12, "volume": 274918365, "turnover_cr": 28436.17,
        "advances": 38, "declines": 12, "unchanged": 0,
        "week52_high": 21928.25, "week52_low": 17312.75,
        "lot_size": 50, "tick_size": 0.05,
        "expiries": ["2024-01-18", "2024-01-25", "2024-02-01", "2024-02-29", "2024-03-28"],
        "market_status": "open",
        "source": "deltastream-storage",
    }
    # Pad to exactly 600 bytes with a deterministic note.
    doc["note"] = ""
    base = len(compact_json(doc).encode())
    doc["note"] = ("benchmark fixture " * 40)[: max(0, 600 - base)]
    return compact_json(doc).encode()


def option_leg(strike: int, i: int, kind: str) -> dict[str, Any]:
    """One call ("CE") or put ("PE") of the ``i``-th strike, made-up but plausible."""
    sign = 1 if kind == "CE" else -1
    moneyness = (21900 - strike) * sign
    return {
        "ltp": round(max(0.05, moneyness + 120 - 0.8 * abs(i - 40)), 2),
        "iv": round(11.5 + 0.07 * abs(i - 40), 2),
        "oi": 100000 + (i * 7919) % 900000,
        "chg_oi": (i * 104729) % 50000 - 25000,
        "vol": 5000 + (i * 15485863) % 400000,
        "delta": round(sign * max(0.01, min(0.99, 0.5 + moneyness / 1200)), 3),
    }


def chain_body(limit: int = 20 * 1024) -> bytes:
    """A deterministic option chain of just under ``limit`` bytes."""
    strikes: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"product": "NIFTY", "expiry": "2024-01-25",
                           "spot": 21894.55, "timestamp": "2024-01-15T10:15:00+05:30",
                           "strikes": strikes}
    i = 0
    while True:
        strike = 19900 + 50 * i
        strikes.append({"strike": strike, "CE": option_leg(strike, i, "CE"),
                        "PE": option_leg(strike, i, "PE")})
        if len(compact_json(doc)) > limit:
            strikes.pop()
            break
        i += 1
    return compact_json(doc).encode()


def write_site(tmp: Path) -> Path:
    """Write both bodies under ``tmp/www`` at their nginx paths; return ``www``."""
    www = tmp / "www"
    (www / "underlying").mkdir(parents=True)
    (www / "option" / "chain").mkdir(parents=True)
    (www / "underlying" / "NIFTY").write_bytes(underlying_body())
    (www / "option" / "chain" / "NIFTY").write_bytes(chain_body())
    # As root, nginx's worker drops to "nobody": let it read the fixtures
    # instead of running the worker as root.
    os.chmod(tmp, 0o711)
    for path in [www, *www.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return www


def check_bodies(direct: int, gateway: int, when: str) -> list[str]:
    """Both bodies, straight from nginx and through the gateway: 200 and byte for byte the same.

    Returns the errors; prints a line for each body that passed.
    """
    errors = []
    for dpath, gpath in BODY_PATHS:
        d_status, d_body, _ = http_get(f"http://{LOOPBACK}:{direct}{dpath}")
        g_status, g_body, _ = http_get(f"http://{LOOPBACK}:{gateway}{gpath}")
        if d_status != 200 or g_status != 200:
            errors.append(f"body check {when}: {gpath} status direct {d_status}, "
                          f"gateway {g_status}")
        elif d_body != g_body:
            errors.append(f"body check {when}: {gpath} body differs "
                          f"({len(g_body)} bytes through the gateway, {len(d_body)} direct)")
        else:
            print(f"  body check {when}: {gpath} 200, {len(g_body)} bytes, identical to direct")
    return errors
