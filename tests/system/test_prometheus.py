"""deploy/prometheus: the alerting rules, their unit tests, the example
configuration and the Grafana dashboard, checked by Debian's promtool, and
by a real Prometheus scraping a real ``twistd -n deltagw --demo`` (the tests
fail if either binary is missing: CI installs them)."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet import error, reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from deltagw.metrics import Metrics
from tests.daemon import Twistd
from tests.redis_server import free_port
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "prometheus"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts_test.yml"
CONFIG = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"

ALERT_NAMES = (
    "DeltagwScrapeDown",
    "DeltagwUpstream5xxRateHigh",
    "DeltagwCircuitOpen",
    "DeltagwShedding",
    "DeltagwRateLimiterDown",
    "DeltagwRequestLatencyP99High",
)

_METRIC_NAME = re.compile(r"\bdeltagw_[a-z0-9_]+")
_VARIABLE = re.compile(r"\$\{?(\w+)")


def tool(name: str) -> str:
    """The path of a Prometheus binary; a missing one fails the test."""
    path = shutil.which(name)
    assert path, f"{name} not found: apt-get install prometheus (.ci/run does)"
    return path


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml, in file order."""
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard (those inside rows too)."""
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", ()))
    return [panel for panel in panels if panel["type"] != "row"]


def exposed_names() -> set[str]:
    """Every sample name a gateway's /metrics can expose (counters with
    ``_total``, histograms with ``_bucket``, ``_sum`` and ``_count``)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                "info": ("_info",), "summary": ("_sum", "_count"), "unknown": ("",)}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temporary directory under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="deltagw-prometheus-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_promtool_checks_the_rules():
    """`promtool check rules` accepts alerts.yml and counts its six alerts."""
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout, result.stdout
    assert tuple(rule["alert"] for rule in alert_rules()) == ALERT_NAMES


def test_promtool_runs_the_rule_unit_tests():
    """`promtool test rules` passes alerts_test.yml, whose seven tests make
    every alert fire and also hold it back (under the threshold, another
    label, or before its `for` has passed)."""
    result = promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    assert len(tests) == 7
    cases = [case for test in tests for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert firing == quiet == set(ALERT_NAMES)


def test_every_firing_expectation_is_checked(scratch):
    """Expecting silence where alerts_test.yml expects an alert fails, for
    every alert: the firing cases assert something promtool really checks."""
    document = yaml.safe_load(ALERTS_TEST.read_text())
    for test in document["tests"]:
        for case in test["alert_rule_test"]:
            case["exp_alerts"] = []
    shutil.copy(ALERTS, scratch / ALERTS.name)
    (scratch / ALERTS_TEST.name).write_text(yaml.safe_dump(document))
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=scratch)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert {name for name in ALERT_NAMES if f"alertname: {name}," in output} == set(ALERT_NAMES)


def test_example_configuration_is_valid():
    """`promtool check config` accepts prometheus.yml, which loads alerts.yml
    and scrapes job "deltagw" (the job DeltagwScrapeDown watches)."""
    result = promtool("check", "config", CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == [ALERTS.name]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["deltagw"]


def test_rules_name_only_metrics_the_gateway_exposes():
    """A misspelt metric in an alert would never fire: every deltagw_* name
    in the rules is one a gateway's /metrics has."""
    used = {name for rule in alert_rules() for name in _METRIC_NAME.findall(rule["expr"])}
    assert len(used) == 5, used
    assert used <= exposed_names(), used - exposed_names()


def test_dashboard_is_well_formed():
    """Each panel has its own id and place, asks the chosen data source, and
    has queries that use only the dashboard's variables and Grafana's
    $__rate_interval."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard_panels()
    assert len(panels) == 11
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(_VARIABLE.findall(target["expr"]))
            assert used <= {"instance", "__rate_interval"}, (panel["title"], used)
            assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_dashboard_shows_every_metric_by_its_exposed_name():
    """Every metric family of /metrics is on the dashboard, under the name
    the exposition gives it (counters ``_total``, histograms ``_bucket``)."""
    used = {
        name
        for panel in dashboard_panels()
        for target in panel["targets"]
        for name in _METRIC_NAME.findall(target["expr"])
    }
    assert used <= exposed_names(), used - exposed_names()
    # The gateway's own families; the build info and the standard process_*
    # and python_* series are for any Prometheus process dashboard.
    families = {family.name for family in Metrics().registry.collect()
                if family.name.startswith("deltagw_") and family.name != "deltagw_build"}
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    shown = {family for family in families if used & {family + suffix for suffix in suffixes}}
    assert shown == families


RATE_WINDOW = "15s"
"""What the live test puts for Grafana's $__rate_interval: at a 1 s scrape
interval the test waits until this window holds several scrapes."""

LIVE_ENV = {
    # Four requests per quarter second: each round of traffic below spends
    # the budget and then gets 429s, and the next round starts refilled.
    "RATE_LIMIT_REQUESTS": "4",
    "RATE_LIMIT_WINDOW": "0.25",
    # The overview's two storage parts start together: the second is shed.
    "MAX_IN_FLIGHT": "1",
}

ROUND = (
    "/api/data/products",
    "/api/analytics/pcr/NIFTY",
    "/api/bff/overview/NIFTY",
    "/api/data/chain/NIFTY",
    "/api/no-such-route",
    "/api/data/products",
    "/api/data/products",
    "/api/data/products",
    "/health",
)
"""One round of traffic: upstream calls to storage and analytics, a shed
call, a 404, and more than the budget (429)."""


def panel_queries() -> list[tuple[str, str]]:
    """``(panel title, query)`` for every query of the dashboard, with
    Grafana's variables as Grafana would fill them (all instances)."""
    return [
        (panel["title"], target["expr"]
         .replace("$__rate_interval", RATE_WINDOW).replace("$instance", ".*"))
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


class Prometheus:
    """Debian's prometheus on a free loopback port, its data in ``directory``."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.client = treq.client.HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        """A successful answer's ``data`` (fails on any other answer)."""
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited {self.process.returncode}:\n{self.log()}")
        response = await self.client.get(self.url + path, params=params)
        body = json.loads(await response.content())
        assert response.code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    async def ready(self) -> bool:
        """Whether it listens and is ready to answer queries (its /-/ready)."""
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited {self.process.returncode}:\n{self.log()}")
        try:
            response = await self.client.get(self.url + "/-/ready")
        except error.ConnectionRefusedError:  # not listening yet
            return False
        await response.content()
        return response.code == 200

    async def query(self, expression: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expression)
        assert data["resultType"] == "vector", (expression, data)
        return data["result"]

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await wait_until(lambda: self.process.poll() is not None, timeout=15)
            except AssertionError:
                self.process.kill()
                self.process.wait()


def _value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


@pytest_twisted.ensureDeferred
async def test_real_prometheus_scrapes_the_demo_and_answers_every_query(scratch):
    """A real Prometheus scrapes a real ``twistd -n deltagw --demo`` every
    second, with alerts.yml loaded, while clients call a few routes (one 404,
    some 429s, a shed call). Then every alert expression and every dashboard
    query parses and runs, each dashboard query returns data with a finite
    value, the rules API lists every alert, evaluated, and the shedding alert
    is pending while the others that cannot hold here are inactive."""
    daemon = Twistd.plugin("--demo", "--demo-state", str(scratch / "demo"), env=LIVE_ENV)
    prometheus: Prometheus | None = None
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    try:
        port = await daemon.port(timeout=20)
        config = yaml.safe_load(CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(ALERTS)]
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        prometheus = Prometheus(scratch, config)

        statuses: Counter[int] = Counter()
        rules: dict[str, dict[str, Any]] = {}

        async def traffic_round() -> None:
            for path in ROUND:
                response = await client.get(f"http://127.0.0.1:{port}{path}")
                await response.content()
                statuses[response.code] += 1

        async def settled() -> bool:
            """Several scrapes in the rate window, every rule evaluated, and
            the shed calls seen by the shedding alert."""
            if not await prometheus.ready():
                return False
            scrapes = await prometheus.query(
                f'count_over_time(up{{job="deltagw"}}[{RATE_WINDOW}])'
            )
            groups = (await prometheus.api("/api/v1/rules"))["groups"]
            rules.clear()
            rules.update({rule["name"]: rule for group in groups for rule in group["rules"]})
            return (
                bool(scrapes) and _value(scrapes[0]) >= 5
                and all(rule["health"] == "ok" for rule in rules.values())
                and rules.get("DeltagwShedding", {}).get("state") == "pending"
                and {200, 404, 429} <= set(statuses)
            )

        deadline = reactor.seconds() + 30
        while True:
            await traffic_round()
            if await settled():
                break
            assert reactor.seconds() < deadline, (
                f"not settled: statuses {dict(statuses)}, rules "
                f"{ {name: (r['health'], r['state']) for name, r in rules.items()} }\n"
                f"{prometheus.log()}"
            )
            # Lets the limiter's budget refill between rounds.
            await deferLater(reactor, 0.3, lambda: None)

        assert sorted(rules) == sorted(ALERT_NAMES)
        assert all(rule["type"] == "alerting" for rule in rules.values())
        states = {name: rule["state"] for name, rule in rules.items()}
        for name in ("DeltagwScrapeDown", "DeltagwCircuitOpen", "DeltagwRateLimiterDown"):
            assert states[name] == "inactive", states

        # query() fails unless the expression parses and runs.
        expressions = {rule["alert"]: await prometheus.query(rule["expr"]) for rule in alert_rules()}
        assert expressions["DeltagwShedding"], "the shed calls do not match the shedding alert"
        assert not expressions["DeltagwRateLimiterDown"]

        results: dict[str, list[dict[str, Any]]] = {}
        for title, expression in panel_queries():
            result = await prometheus.query(expression)
            assert result, f"{title}: no data for {expression}"
            assert any(math.isfinite(_value(sample)) for sample in result), (title, result)
            results[expression] = result
        assert len(results) == 17

        by_query = {title: results[expression] for title, expression in panel_queries()}
        requests = {(s["metric"]["route"], s["metric"]["status"])
                    for s in by_query["Requests by route and status"]}
        assert {("/api/data/products", "200"), ("/api/data/products", "429"),
                ("unmatched", "404")} <= requests, requests
        failures = {(s["metric"]["service"], s["metric"]["reason"])
                    for s in by_query["Upstream failures by service and reason"]}
        assert ("storage", "shed") in failures, failures
        assert {s["metric"]["group"] for s in by_query["Rate-limited requests by group"]} == {"data"}
        # The demo's product list says max-age=60: asked again and again, it is a miss then hits.
        assert {"miss", "hit"} <= {s["metric"]["result"] for s in by_query["Cache results"]}
        circuits = {s["metric"]["service"]: _value(s) for s in by_query["Circuit state"]}
        assert circuits == {"auth": 0.0, "storage": 0.0, "analytics": 0.0}
        assert [_value(s) for s in by_query["Rate limiter backend"]] == [1.0]
    finally:
        if prometheus is not None:
            await prometheus.stop()
        await pool.closeCachedConnections()
        await daemon.stop()
