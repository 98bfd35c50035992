"""The Prometheus and Alertmanager files, checked by the real promtool and amtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from .conftest import REPO, require_binary

PROM = REPO / "prometheus"


def run(argv: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)


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


def test_amtool_check_config() -> None:
    amtool = require_binary("amtool")
    result = run([amtool, "check-config", str(PROM / "alertmanager.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_routes_repairs_to_the_receiver() -> None:
    amtool = require_binary("amtool")
    result = run([amtool, "config", "routes", "test", "--config.file", str(PROM / "alertmanager.yml"),
                  "alertname=CaretakerServiceDown", "service_name=redis", "remediation=restart"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "caretaker"


def test_every_alert_is_unit_tested_and_names_its_service() -> None:
    rules = yaml.safe_load((PROM / "rules" / "caretaker-alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for f in (PROM / "tests").glob("*.test.yml")
              for case in yaml.safe_load(f.read_text())["tests"] for t in case.get("alert_rule_test", [])}
    assert set(alerts) <= tested, f"alerts without promtool tests: {set(alerts) - tested}"
    for name, rule in alerts.items():
        has_label = "service_name" in rule.get("labels", {}) or "service_name" in rule["expr"] or \
            rule["expr"].startswith("caretaker_")
        assert has_label, f"{name} does not carry service_name"
        assert rule["labels"].get("severity") in ("critical", "warning", "info"), name
