"""The chart's alerts and Grafana dashboard, checked offline: the PrometheusRule's groups pass `promtool check rules`
and the unit tests in tests/prometheus/ (each alert fires, and does not fire, on synthetic series), and a copy of the
chart with a changed threshold fails them; every dashboard expression parses (promtool) and names only metrics and
labels the API really exports (read from a real exporter on a real Redis), or Prometheus' own `up`.

promtool comes from Debian's `prometheus` package (`make install`, scripts/ensure-tool.sh); without it these tests
fail, they never skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from potpie_service.api.metrics import ApiMetrics
from potpie_service.config import Settings
from potpie_service.core.metrics import FAMILIES
from potpie_service.store import make_store
from tests.stack import ROOT, RedisServer
from tests.test_deploy import CHART, Helm, helm_bin

DASHBOARD = CHART / "dashboards" / "potpie-service.json"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts.test.yaml"
NAMESPACE = "potpie"  # the namespace alerts.test.yaml's series live in
ALERTS = {"PotpieNoWorkerConsuming", "PotpieQueueOldestJobTooOld", "PotpieJobFailureRatioHigh",
          "PotpieRedisUnreachable", "PotpieApiMetricsDown", "PotpieUpstreamErrorRatioHigh", "PotpieRejectsTheService"}
# Labels Prometheus puts on every series of a ServiceMonitor target (the API exports none of them itself; the
# ServiceMonitor honours the API's own `endpoint` label on the Potpie call metrics).
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "container", "endpoint"}
GRAFANA_VARIABLES = {"$namespace": NAMESPACE, "$job": "potpie-service-api", "$__rate_interval": "5m"}


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("no promtool on PATH: run `make install` (Debian's prometheus package ships /usr/bin/promtool)")
    return binary


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    binary = helm_bin()
    if binary is None:
        pytest.fail("no helm binary in .venv/bin, .tools/bin or PATH: run `make install` (scripts/ensure-helm.sh)")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


def rendered_groups(helm: Helm, *args: str) -> dict[str, Any]:
    """The PrometheusRule's groups as a Prometheus rule file, rendered for namespace `potpie`."""
    docs = helm.render("--namespace", NAMESPACE, "--set", "metrics.prometheusRule.enabled=true", *args)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return {"groups": rule["spec"]["groups"]}


def promtool_test(promtool: str, folder: Path, groups: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Write the groups as rules.yaml beside a copy of the unit tests and run `promtool test rules`."""
    (folder / "rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    shutil.copy(ALERT_TESTS, folder / ALERT_TESTS.name)
    return subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=folder, capture_output=True, text=True,
                          timeout=60)


def test_the_rendered_alert_rules_pass_promtool_check(helm: Helm, promtool: str, tmp_path: Path) -> None:
    groups = rendered_groups(helm)
    assert {rule["alert"] for rule in groups["groups"][0]["rules"]} == ALERTS
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    checked = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0 and f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout, \
        checked.stdout + checked.stderr
    for rule in groups["groups"][0]["rules"]:
        assert rule["labels"]["severity"] in ("critical", "warning") and rule["annotations"]["summary"], rule
        assert 'namespace="potpie", job="potpie-service-api"' in rule["expr"], "scoped to this release's API"


def test_each_alert_fires_and_stays_quiet_in_the_promtool_unit_tests(helm: Helm, promtool: str,
                                                                    tmp_path: Path) -> None:
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == ALERTS, "every alert has unit tests"
    done = promtool_test(promtool, tmp_path, rendered_groups(helm))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("change, alert", [
    ("metrics.prometheusRule.noWorkerConsuming.for=1m", "PotpieNoWorkerConsuming"),  # a rollout would page
    ("metrics.prometheusRule.noWorkerConsuming.for=30m", "PotpieNoWorkerConsuming"),
    ("metrics.prometheusRule.queueOldestJob.thresholdSeconds=3600", "PotpieQueueOldestJobTooOld"),
    ("metrics.prometheusRule.queueOldestJob.thresholdSeconds=300", "PotpieQueueOldestJobTooOld"),
    ("metrics.prometheusRule.jobFailureRatio.threshold=0.05", "PotpieJobFailureRatioHigh"),
    ("metrics.prometheusRule.jobFailureRatio.minJobs=1", "PotpieJobFailureRatioHigh"),
    ("metrics.prometheusRule.redisUnreachable.for=0m", "PotpieRedisUnreachable"),
    ("metrics.prometheusRule.redisUnreachable.for=10m", "PotpieRedisUnreachable"),
    ("metrics.prometheusRule.apiMetricsDown.for=1m", "PotpieApiMetricsDown"),
    ("metrics.prometheusRule.potpieErrors.minCalls=5", "PotpieUpstreamErrorRatioHigh"),
    ("metrics.prometheusRule.potpieErrors.threshold=0.05", "PotpieUpstreamErrorRatioHigh"),
    ("metrics.prometheusRule.potpieRejects.window=30m", "PotpieRejectsTheService"),
    ("metrics.prometheusRule.selector=job=\"potpie-api\"", "PotpieApiMetricsDown"),
])
def test_the_unit_tests_fail_when_an_alert_changes(helm: Helm, promtool: str, tmp_path: Path, change: str,
                                                   alert: str) -> None:
    """The promtool tests can fail: a changed threshold, window or selector breaks the tests of that alert."""
    done = promtool_test(promtool, tmp_path, rendered_groups(helm, "--set-json", _as_json(change)))
    assert done.returncode != 0 and alert in done.stdout + done.stderr, done.stdout + done.stderr


def _as_json(change: str) -> str:
    """`path=value` for --set-json (plain --set turns 0.05 into a string, which the chart's schema refuses)."""
    path, value = change.split("=", 1)
    try:
        return f"{path}={json.dumps(json.loads(value))}"
    except ValueError:
        return f"{path}={json.dumps(value)}"


# --- the Grafana dashboard ---------------------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) of every target, with Grafana's variables filled in as Grafana would."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


@pytest.fixture(scope="module")
def exported(redis_server: RedisServer) -> Iterator[dict[str, set[str]]]:
    """Every series name the API exports, with its labels: the real exporter of an API process, reading a real
    Redis (histograms and labelled counters with no sample yet are named by their families)."""
    settings = Settings(redis_url_raw=redis_server.url, queue_name="q-monitoring")
    body, _ = ApiMetrics(settings, make_store(settings), type("Count", (), {"value": 0})()).render()
    labels = {name: set(family.labels) for name, family in FAMILIES.items()}
    labels["potpie_http_request_duration_seconds"] = {"method", "route", "status"}
    names: dict[str, set[str]] = {"up": set()}  # Prometheus' own, per target
    for family in text_string_to_metric_families(body.decode()):
        own = labels.get(family.name, labels.get(f"{family.name}_total", set()))
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        for suffix in suffixes:
            names[family.name + suffix] = own | ({"le"} if suffix == "_bucket" else set())
    yield names


def test_the_dashboard_is_valid_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] == "potpie-service" and board["title"] == "potpie-service" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(panel_exprs()) >= 20


def test_every_dashboard_expression_parses(promtool: str, tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:panel_{i}", "expr": expr} for i, (_, expr) in enumerate(panel_exprs())]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", "dashboard.yaml"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # ... and a broken one would not: promtool is really parsing them
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "dashboard:broken", "expr": "sum by (le (rate(potpie_queue_depth[5m]))"}]}]}))
    assert subprocess.run([promtool, "check", "rules", "broken.yaml"], cwd=tmp_path, capture_output=True,
                          timeout=60).returncode != 0


SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def test_the_dashboard_names_only_what_the_service_exports(exported: dict[str, set[str]]) -> None:
    potpie_labels = set().union(*exported.values())
    for title, expr in panel_exprs():
        selectors = SELECTOR.findall(expr)
        assert selectors, (title, expr)
        for name, matchers in selectors:
            assert name in exported, f"{title}: {name} is not exported by the API"
            used = {m.split("=")[0].strip(" !~") for m in matchers.split(",") if m.strip()}
            assert used <= exported[name] | TARGET_LABELS, (title, name, used - exported[name] - TARGET_LABELS)
        bare = set(re.findall(r"\b(?:potpie|process)_[a-z_]+\b", expr)) - {name for name, _ in selectors}
        assert not bare, f"{title}: metric names without a selector: {bare}"
        for group in GROUPING.findall(expr):
            labels = {label.strip() for label in group.split(",") if label.strip()}
            assert labels <= potpie_labels | TARGET_LABELS, (title, labels)


def test_the_alert_rules_name_only_what_the_service_exports(helm: Helm, exported: dict[str, set[str]]) -> None:
    for rule in rendered_groups(helm)["groups"][0]["rules"]:
        for name, _ in SELECTOR.findall(rule["expr"]):
            assert name in exported, f"{rule['alert']}: {name} is not exported by the API"
