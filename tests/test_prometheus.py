"""deploy/prometheus: the alerting rules, their unit tests, the example
configuration and the Grafana dashboard, checked by Debian's promtool (the
test fails if it is missing: CI installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deltagw.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
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
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temporary directory under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="h-prom-", dir="/tmp"))
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
    assert len(panels) == 9
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
    families = {family.name for family in Metrics().registry.collect()}
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    shown = {family for family in families if used & {family + suffix for suffix in suffixes}}
    assert shown == families
