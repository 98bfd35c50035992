"""The Prometheus and Alertmanager files, checked by the real promtool and amtool."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from .helpers import REPO, require_binary, run

PROM = REPO / "prometheus"
ALERTS = yaml.safe_load((PROM / "rules" / "caretaker-alerts.yml").read_text())
ALERT_RULES = [r for g in ALERTS["groups"] for r in g["rules"]]


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = require_binary("promtool")
    tests = sorted((PROM / "tests").glob("*.test.yml"))
    assert tests
    result = run([promtool, "test", "rules", *map(str, tests)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_config_and_rules() -> None:
    promtool = require_binary("promtool")
    result = run([promtool, "check", "config", str(PROM / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    for rules in sorted((PROM / "rules").glob("*.yml")):
        result = run([promtool, "check", "rules", str(rules)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout


def test_amtool_check_config() -> None:
    amtool = require_binary("amtool")
    result = run([amtool, "check-config", str(PROM / "alertmanager.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("labels", "receivers"), [
    ("alertname=CaretakerServiceDown service_name=redis remediation=restart severity=critical",
     "caretaker,people-critical"),
    ("alertname=CaretakerDiskAlmostFull service_name=redis remediation=clean severity=warning", "caretaker,people"),
    ("alertname=CaretakerClaimsOrphaned service_name=worker remediation=release_claims severity=warning",
     "caretaker,people"),
    ("alertname=CaretakerProbeSlow service_name=redis severity=warning", "people"),
    ("alertname=CaretakerRepairsExhausted service_name=redis severity=critical", "people-critical"),
    ("alertname=SomethingElse severity=info", "people"),
])
def test_alertmanager_routes(labels: str, receivers: str) -> None:
    amtool = require_binary("amtool")
    result = run([amtool, "config", "routes", "test", "--config.file", str(PROM / "alertmanager.yml"),
                  *labels.split()])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


@pytest.mark.parametrize(("labels", "receivers"), [
    # Each host's repair alerts go to its own receiver (two webhooks for db-1's pair), and on to people.
    ("alertname=CaretakerServiceDown host=web-2 service_name=redis remediation=restart severity=critical",
     "caretaker-web-2,people-critical"),
    ("alertname=CaretakerServiceDown host=web-1 service_name=redis remediation=restart severity=critical",
     "caretaker-web-1,people-critical"),
    ("alertname=CaretakerDiskAlmostFull host=db-1 service_name=postgres remediation=clean severity=warning",
     "caretaker-db-1,people"),
    # A host not in the list, or no host label: no receiver repairs it; people still hear.
    ("alertname=CaretakerServiceDown host=web-9 service_name=redis remediation=restart severity=critical",
     "people-critical"),
    ("alertname=CaretakerServiceDown service_name=redis remediation=restart severity=critical", "people-critical"),
    # What asks for no repair is people's, as before.
    ("alertname=CaretakerProbeSlow host=web-1 service_name=redis severity=warning", "people"),
    ("alertname=CaretakerReceiverDown host=web-1 service_name=caretaker-receiver severity=critical",
     "people-critical"),
])
def test_fleet_alertmanager_routes(labels: str, receivers: str) -> None:
    """prometheus/fleet/alertmanager.yml, made by scripts/fleet-alertmanager.py (tests/test_fleet.py keeps it so)."""
    amtool = require_binary("amtool")
    config = str(PROM / "fleet" / "alertmanager.yml")
    assert run([amtool, "check-config", config]).returncode == 0
    result = run([amtool, "config", "routes", "test", "--config.file", config, *labels.split()])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


def promtool_cases() -> list[dict[str, object]]:
    """Every ``alert_rule_test`` item of the promtool unit tests."""
    return [t for f in sorted((PROM / "tests").glob("*.test.yml"))
            for case in yaml.safe_load(f.read_text())["tests"] for t in case.get("alert_rule_test", [])]


def test_every_alert_is_unit_tested() -> None:
    tested = {t["alertname"] for t in promtool_cases()}
    names = {r["alert"] for r in ALERT_RULES}
    assert names <= tested, f"alerts without promtool tests: {names - tested}"


@pytest.mark.parametrize("name", sorted({r["alert"] for r in ALERT_RULES}))
def test_every_alert_keeps_service_name(name: str) -> None:
    """An alert names its service: a fixed ``service_name`` label, or one the expression
    keeps, as promtool shows in every firing case (promtool compares labels exactly, so an
    expression that aggregates ``service_name`` away fails these cases)."""
    rules = [r for r in ALERT_RULES if r["alert"] == name]
    if all("service_name" in r["labels"] for r in rules):
        return
    fired = [alert["exp_labels"] for t in promtool_cases() if t["alertname"] == name
             for alert in t.get("exp_alerts") or []]
    assert fired, f"{name}: no promtool case shows it firing"
    assert all(labels.get("service_name") for labels in fired), f"{name}: a firing case has no service_name"


@pytest.mark.parametrize("rule", ALERT_RULES, ids=[f"{r['alert']}-{i}" for i, r in enumerate(ALERT_RULES)])
def test_every_alert_is_actionable(rule: dict[str, object]) -> None:
    labels = rule["labels"]
    annotations = rule["annotations"]
    assert isinstance(labels, dict) and isinstance(annotations, dict)
    assert labels["severity"] in ("critical", "warning", "info")
    assert {"summary", "description", "runbook_url"} <= set(annotations)
    anchor = str(annotations["runbook_url"]).split("#", 1)[1]
    runbook = (REPO / "docs" / "runbook.md").read_text()
    headings = {re.sub(r"[^a-z0-9-]", "", h.lower().replace(" ", "-")) for h in re.findall(r"^## (.+)$", runbook, re.M)}
    assert anchor in headings, f"docs/runbook.md has no section #{anchor}"
    if "remediation" in labels:
        assert labels["remediation"] in ("restart", "stop_duplicates", "restore_file", "ensure_paths", "clean",
                                         "free_port", "release_claims")


def test_dashboards_are_generated_from_grafana_generate_py() -> None:
    result = run([sys.executable, str(REPO / "grafana" / "generate.py"), "--check"])
    assert result.returncode == 0, result.stderr


def test_dashboards_use_the_provisioned_datasource_and_a_service_variable() -> None:
    provisioned = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    for path in sorted((REPO / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        assert board["uid"].startswith("caretaker-")
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == uid
            assert panel["targets"], panel["title"]
    service = json.loads((REPO / "grafana/dashboards/service.json").read_text())
    assert [v["name"] for v in service["templating"]["list"]] == ["host", "service_name"]
