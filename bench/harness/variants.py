"""Other servers loaded with ``small_64c`` in the same rounds, right after the gateway's run.

Each answers one question next to the gateway's own figures: what a cache
hit costs next to the gateway's proxied miss (a twin that answers from its
cache), what the limiter costs (two twins, on and off), what the speedups buy (a stock twin),
how a change compares (a previous twistd), the floor under the gateway's CPU
(the bare Twisted proxy), and what ``--workers`` gives (1 process vs N).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import NamedTuple

from harness.cpu_memory import children_cpu_seconds
from harness.errors import BenchError
from harness.fixtures import underlying_body
from harness.locations import LOOPBACK
from harness.polling import http_get, wait_until
from harness.processes import Launcher
from harness.scenarios import SMALL_64C

LIMITER_ON = "gateway_limiter_on"
LIMITER_OFF = "gateway_limiter_off"
BASELINE = "baseline_proxy"
ONE_PROCESS = "gateway_1proc_t1"
CACHE_HIT = "gateway_cache_hit"

# The cache-hit twin's one difference: answers without Cache-Control (nginx's)
# may be kept an hour, longer than any run.
CACHE_HIT_ENV = {"CACHE_TTL": "data:3600"}

# (name, label, environment) of the limiter twins.
LIMITER_TWINS = (("limiter_on", "limiter on (large budget)", {}),
                 ("limiter_off", "limiter off (RATE_LIMIT_REQUESTS=0)",
                  {"RATE_LIMIT_REQUESTS": "0"}))


class Variant(NamedTuple):
    """A server (or a wrk setting) that runs ``small_64c`` next to the gateway."""

    name: str                 # its key in the results
    label: str                # how the report names it
    url: str
    wrk_threads: int | None   # None: wrk's default for 64 connections (2)
    pid: int                  # whose CPU (with its children's) counts


def workers_variant_name(workers: int) -> str:
    """The results key of the ``--workers N`` gateway's runs."""
    return f"gateway_workers{workers}_t1"


def small_url(port: int) -> str:
    """The small body's URL on a gateway listening on ``port``."""
    return f"http://{LOOPBACK}:{port}{SMALL_64C.gateway_path}"


def start_cache_hit_twin(launcher: Launcher, workers: int | None) -> tuple[Variant, Path]:
    """A fresh twin whose cache keeps nginx's answer (``CACHE_HIT_ENV``), and its log.

    Fresh so that it serves nothing but the hot key; every answer after its
    first is a cache hit.
    """
    port, proc, log = launcher.start_gateway(workers, name="gateway-cache-hit",
                                             extra_env=CACHE_HIT_ENV)
    ttl = CACHE_HIT_ENV["CACHE_TTL"]
    return Variant(CACHE_HIT, f"gateway twin, CACHE_TTL={ttl}: cache hits", small_url(port),
                   None, proc.pid), log


def start_limiter_twins(launcher: Launcher, workers: int | None) -> list[tuple[Variant, Path]]:
    """Two fresh twins that serve only this load, limiter on and off, and their logs.

    Fresh so that both have the same history (the main gateway serves every
    scenario); their order alternates between rounds.
    """
    started = []
    for name, label, env in LIMITER_TWINS:
        port, proc, log = launcher.start_gateway(workers, name=f"gateway-{name.replace('_', '-')}",
                                                 extra_env=env)
        started.append((Variant(f"gateway_{name}", f"gateway twin, {label}", small_url(port),
                                None, proc.pid), log))
    return started


def start_code_twins(launcher: Launcher, workers: int | None, stock: bool,
                     previous_twistd: Path | None) -> list[tuple[Variant, Path]]:
    """The stock twin (SPEEDUPS=0) and the previous code's gateway, as asked; and their logs."""
    twins = [("stock", "gateway twin, SPEEDUPS=0", launcher.twistd, {"SPEEDUPS": "0"})
             ] if stock else []
    if previous_twistd:
        twins.append(("previous", f"previous gateway ({previous_twistd})",
                      str(previous_twistd), {}))
    started = []
    for name, label, twistd, env in twins:
        port, proc, log = launcher.start_gateway(workers, name=f"gateway-{name}",
                                                 extra_env=env, twistd=twistd)
        started.append((Variant(f"gateway_{name}", label, small_url(port), None, proc.pid), log))
    return started


def start_baseline_variant(launcher: Launcher) -> Variant:
    """The bare Twisted proxy: it relays nginx's paths, not the gateway's."""
    port, proc = launcher.start_baseline()
    return Variant(BASELINE, "bare Twisted proxy (bench/baseline_proxy.py)",
                   f"http://{LOOPBACK}:{port}{SMALL_64C.direct_path}", None, proc.pid)


def start_workers_variants(launcher: Launcher, workers: int, warmup: float, gateway_url: str,
                           gateway_pid: int) -> tuple[list[Variant], Path]:
    """A ``--workers N`` gateway and the main one, both loaded by wrk with 1 thread; its log."""
    port, proc, log = launcher.start_gateway(workers, name=f"gateway-workers{workers}")
    # /health answers once any worker serves; wait for all of them to exist
    # (the warm-up then gives each time to adopt the socket).
    wait_until(lambda: len(children_cpu_seconds(proc.pid)) >= workers,
               20, f"{workers} workers", alive=lambda: proc.poll() is None)
    if not warmup:
        time.sleep(2)
    return [Variant(ONE_PROCESS, "gateway, 1 process, wrk 1 thread", gateway_url, 1, gateway_pid),
            Variant(workers_variant_name(workers), f"gateway --workers {workers}, wrk 1 thread",
                    small_url(port), 1, proc.pid)], log


def check_variant_bodies(variants: list[Variant]) -> None:
    """Every variant must answer the fixture itself before its figures mean anything."""
    for variant in variants:
        status, body, _ = http_get(variant.url)
        if status != 200 or body != underlying_body():
            raise BenchError(f"body check: {variant.label} answered {status} with "
                             f"{len(body)} bytes, not the fixture")


def start_variants(args: argparse.Namespace, launcher: Launcher, gateway_url: str,
                   gateway_pid: int) -> tuple[list[Variant], list[Path]]:
    """Start the variants the options ask for; the variants and the gateway logs to scan."""
    # The cache-hit twin first: its runs follow the gateway's, the miss they are compared with.
    started = [start_cache_hit_twin(launcher, args.workers)] if args.cache_hit else []
    if args.limiter_cost:
        started += start_limiter_twins(launcher, args.workers)
    started += start_code_twins(launcher, args.workers, args.stock, args.previous_twistd)
    variants = [variant for variant, _ in started]
    logs = [log for _, log in started]
    if args.baseline:
        variants.append(start_baseline_variant(launcher))
    if args.compare_workers:
        workers_variants, log = start_workers_variants(launcher, args.compare_workers,
                                                       args.warmup, gateway_url, gateway_pid)
        variants += workers_variants
        logs.append(log)
    check_variant_bodies(variants)
    if variants:
        print("  also at 64 connections: " + "; ".join(
            f"{variant.label} (pid {variant.pid})" for variant in variants))
    return variants, logs
