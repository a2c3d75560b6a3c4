"""Starting and stopping what the benchmark measures: nginx, the gateways, the bare proxy.

Each child runs in its own session and is stopped by its id (``Processes``),
also on Ctrl-C or an error, so that nothing outlives the run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import BenchError
from harness.fixtures import write_site
from harness.locations import BENCH_DIR, LOOPBACK, venv_python
from harness.polling import http_get, wait_until

NOFILE_WANTED = 65536
# nginx's counters (stub_status): how many requests reached the upstream.
NGINX_STATUS_PATH = "/nginx_status"


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise this process's open-file limit as far as allowed; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (wanted, hard if hard != resource.RLIM_INFINITY else wanted):
        target = min(limit, hard) if hard != resource.RLIM_INFINITY else limit
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_child_nofile() -> None:
    """``preexec_fn`` of the gateways: the benchmark raises their limit, not the gateway's code."""
    raise_nofile()


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, to show why a process did not start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Processes:
    """The children we start; each in its own session, stopped by its id."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, int]] = []

    def add(self, name: str, proc: subprocess.Popen, stop_signal: int) -> None:
        """Stop ``proc`` with ``stop_signal`` at the end (``name`` is for messages)."""
        self.procs.append((name, proc, stop_signal))

    def exited(self) -> list[tuple[str, int]]:
        """Name and exit status of each child that is no longer running."""
        return [(name, proc.returncode) for name, proc, _ in self.procs
                if proc.poll() is not None]

    def stop_all(self) -> None:
        """Stop the children, the last started first."""
        for name, proc, sig in reversed(self.procs):
            if proc.poll() is None:
                stop(name, proc, sig)
        self.procs.clear()


def stop(name: str, proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the child's process group; SIGKILL it if it does not stop in 15 s."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        print(f"  {name} did not stop on signal {sig}; killing", file=sys.stderr)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
    # nginx workers share the master's process group: make sure none is left.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_ready(url: str, deadline_s: float, what: str, proc: subprocess.Popen,
               logs: list[Path]) -> None:
    """Wait for ``url`` to answer 200; on failure print the logs' tails, which say why."""
    try:
        wait_until(lambda: http_get(url, 1)[0] == 200, deadline_s, what,
                   alive=lambda: proc.poll() is None)
    except BenchError:
        print(*(tail(log) for log in logs), sep="\n", file=sys.stderr)
        raise


def nginx_config(tmp: Path, www: Path, port: int) -> str:
    """One worker, no access log, keep-alive without limit: nginx as a fast, quiet upstream.

    Its request counter (``NGINX_STATUS_PATH``) replaces an access log: it
    tells which runs reached nginx without costing nginx anything per request.
    """
    return f"""\
worker_processes 1;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    types {{ }}
    default_type application/json;
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    open_file_cache max=16 inactive=600s;
    open_file_cache_valid 600s;
    client_body_temp_path {tmp}/nginx-tmp/body;
    proxy_temp_path {tmp}/nginx-tmp/proxy;
    fastcgi_temp_path {tmp}/nginx-tmp/fastcgi;
    uwsgi_temp_path {tmp}/nginx-tmp/uwsgi;
    scgi_temp_path {tmp}/nginx-tmp/scgi;
    server {{
        listen {LOOPBACK}:{port};
        root {www};
        location / {{ }}
        location = {NGINX_STATUS_PATH} {{ stub_status; }}
    }}
}}
"""


def start_nginx(tmp: Path, procs: Processes, nginx: str) -> tuple[int, subprocess.Popen]:
    """An unprivileged nginx serving the fixtures from ``tmp``; its port and process."""
    www = write_site(tmp)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_config(tmp, www, port))
    (tmp / "nginx-tmp").mkdir()
    proc = subprocess.Popen(
        [nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf),
         "-g", "daemon off;"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(tmp / "nginx-stderr.log", "wb"), start_new_session=True,
    )
    procs.add("nginx", proc, signal.SIGTERM)
    wait_ready(f"http://{LOOPBACK}:{port}/underlying/NIFTY", 15, "nginx", proc,
               [tmp / "nginx-error.log", tmp / "nginx-stderr.log"])
    return port, proc


def nginx_requests_served(status_url: str) -> int:
    """nginx's count of the requests it has served, this one included (stub_status)."""
    status, body, _ = http_get(status_url)
    lines = body.decode("ascii", "replace").splitlines()
    if status != 200 or len(lines) < 3 or len(lines[2].split()) != 3:
        raise BenchError(f"nginx status page answered {status}: {body[:200]!r}")
    return int(lines[2].split()[2])


def nginx_requests_settled(status_url: str, quiet_s: float = 0.05,
                           deadline_s: float = 5.0) -> int:
    """nginx's count of requests served, once none has reached it for ``quiet_s``.

    A gateway that was saturated when its wrk stopped still forwards the
    requests it had read by then; counted from the next run's start, they
    would look like the next server's.
    """
    deadline = time.monotonic() + deadline_s
    served = nginx_requests_served(status_url)
    while True:
        time.sleep(quiet_s)
        now = nginx_requests_served(status_url)
        if now == served + 1 or time.monotonic() > deadline:  # + 1: the reading itself
            return now
        served = now


def gateway_environment(port: int, upstream_port: int,
                        extra_env: dict[str, str] | None) -> dict[str, str]:
    """Our environment with the gateway's own settings defaulted, except what the run sets."""
    env = dict(os.environ)
    for key in list(env):  # default everything else
        if key.endswith("_SERVICE_URL") or key.startswith(("RATE_LIMIT_", "UPSTREAM_", "CACHE")) \
                or key in ("SPEEDUPS", "BUSY_POLL_US"):
            del env[key]
    env.update({
        "PORT": f"tcp:{port}:interface={LOOPBACK}",
        "STORAGE_SERVICE_URL": f"http://{LOOPBACK}:{upstream_port}",
        # The limiter's budget must not be what the load measures.
        "RATE_LIMIT_REQUESTS": "100000000",
        "RATE_LIMIT_WINDOW": "1",
        **(extra_env or {}),
    })
    return env


@dataclass
class Launcher:
    """Starts the run's gateways and bare proxy: in its work dir, in front of its nginx.

    Each child is added to ``procs``, which stops them all at the end.
    """

    tmp: Path
    procs: Processes
    twistd: str
    upstream_port: int

    def start_gateway(self, workers: int | None, name: str = "gateway",
                      extra_env: dict[str, str] | None = None,
                      twistd: str | None = None) -> tuple[int, subprocess.Popen, Path]:
        """``twistd -n deltagw`` (ours, or ``twistd``); its port, process and log file."""
        port = free_port()
        env = gateway_environment(port, self.upstream_port, extra_env)
        log = self.tmp / f"{name}.log"
        argv = [twistd or self.twistd, "-n", "--pidfile=", "deltagw"]
        if workers:
            argv.append(f"--workers={workers}")
        proc = subprocess.Popen(
            argv, env=env, cwd=self.tmp,  # cwd: import the installed deltagw, not a checkout
            stdin=subprocess.DEVNULL, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=raise_child_nofile,
        )
        self.procs.add(name, proc, signal.SIGTERM)
        wait_ready(f"http://{LOOPBACK}:{port}/health", 20, name, proc, [log])
        return port, proc, log

    def start_baseline(self) -> tuple[int, subprocess.Popen]:
        """The bare Twisted proxy (bench/baseline_proxy.py), for calibration."""
        port = free_port()
        log = self.tmp / "baseline.log"
        proc = subprocess.Popen(
            [venv_python(self.twistd), str(BENCH_DIR / "baseline_proxy.py"), str(port),
             f"http://{LOOPBACK}:{self.upstream_port}"],
            cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=open(log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=raise_child_nofile,
        )
        self.procs.add("baseline", proc, signal.SIGTERM)
        wait_ready(f"http://{LOOPBACK}:{port}/underlying/NIFTY", 20, "baseline proxy", proc,
                   [log])
        return port, proc


def run_limiter_script(twistd: str, tmp: Path, procs: Processes) -> dict[str, Any]:
    """Run bench/limiter.py (with the venv of ``twistd``) to the end; the figures it wrote."""
    out = tmp / "limiter.json"
    # Its own session, stopped like the other children: SIGTERM reaches both
    # it and the redis-server it starts, so neither outlives an interrupted run.
    log = tmp / "limiter.log"
    proc = subprocess.Popen([venv_python(twistd), str(BENCH_DIR / "limiter.py"),
                             "--json", str(out)],
                            cwd=tmp, stdin=subprocess.DEVNULL, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    procs.add("limiter", proc, signal.SIGTERM)
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        raise BenchError("bench/limiter.py did not finish in 600 s") from None
    if proc.returncode != 0 or not out.exists():
        raise BenchError(f"bench/limiter.py failed ({proc.returncode}): {tail(log)}")
    return json.loads(out.read_text())
