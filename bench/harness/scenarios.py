"""The three loads every run measures, straight at nginx and through the gateway."""

from __future__ import annotations

from typing import NamedTuple

from harness.locations import LOOPBACK


class Scenario(NamedTuple):
    """One load: the same body, fetched from nginx directly and through the gateway."""

    key: str
    description: str
    direct_path: str   # on nginx
    gateway_path: str
    connections: int


SCENARIOS = [
    Scenario("small_1c", "small JSON (~600 B), 1 connection",
             "/underlying/NIFTY", "/api/data/underlying/NIFTY", 1),
    Scenario("small_64c", "small JSON (~600 B), 64 connections",
             "/underlying/NIFTY", "/api/data/underlying/NIFTY", 64),
    Scenario("chain_16c", "20 KB JSON pass-through, 16 connections",
             "/option/chain/NIFTY", "/api/data/chain/NIFTY", 16),
]
# The load the variants (twins, bare proxy, workers) run too.
SMALL_64C = SCENARIOS[1]


def scenario_urls(direct_port: int, gateway_port: int) -> dict[str, dict[str, str]]:
    """``{scenario key: {"direct": url on nginx, "gateway": url through the gateway}}``."""
    return {s.key: {"direct": f"http://{LOOPBACK}:{direct_port}{s.direct_path}",
                    "gateway": f"http://{LOOPBACK}:{gateway_port}{s.gateway_path}"}
            for s in SCENARIOS}
