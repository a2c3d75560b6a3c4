"""deploy/prometheus: the alerting rules, their unit tests and the example
configuration, checked by Debian's promtool (the test fails if it is missing:
CI installs it)."""

from __future__ import annotations

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

ALERT_NAMES = (
    "DeltagwScrapeDown",
    "DeltagwUpstream5xxRateHigh",
    "DeltagwCircuitOpen",
    "DeltagwShedding",
    "DeltagwRateLimiterDown",
    "DeltagwRequestLatencyP99High",
)

_METRIC_NAME = re.compile(r"\bdeltagw_[a-z0-9_]+")


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
