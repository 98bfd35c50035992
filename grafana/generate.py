"""Writes caretaker's Grafana dashboards (grafana/dashboards/*.json).

    python grafana/generate.py          # rewrite the JSON files
    python grafana/generate.py --check  # exit 1 if they are out of date (the tests do this)

Edit the panels here, not in the JSON. Every query is run against a live Prometheus
by ``tests/test_e2e.py`` (panels listed in ``CORE`` must return data there) and, with
a host picked, by ``tests/test_fleet.py``.

Every dashboard has a ``host`` variable (the target label of a fleet, docs/fleet.md;
"All" is ``.*``, which also matches a single host's series that have no such label), and
every query selects ``host=~"$host"``; aggregations keep ``host``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "prometheus"}
HOST = 'host=~"$host"'
SVC = f'{HOST},service_name=~"$service_name"'


class Board:
    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = 0
        self._row_h = 0

    def panel(self, title: str, kind: str, targets: list[tuple[str, str]], unit: str = "short", w: int = 12,
              h: int = 8, description: str = "", **options: Any) -> None:
        if self._x + w > 24:
            self._x, self._y = 0, self._y + self._row_h
            self._row_h = 0
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": DS, "gridPos": {"x": self._x, "y": self._y, "w": w, "h": h},
            # The host last in a legend: with a single host (no label) it is empty.
            "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": expr,
                         "legendFormat": legend if "{{host}}" in legend else f"{legend} {{{{host}}}}"}
                        for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, **options.pop("defaults", {})}, "overrides": []},
            "options": options,
        }
        self.panels.append(panel)
        self._x += w
        self._row_h = max(self._row_h, h)

    def json(self) -> dict[str, Any]:
        templating: list[dict[str, Any]] = []
        for name, label, query in (
                ("host", "Host", 'label_values(up{job=~"caretaker-exporter|caretaker-receiver"}, host)'),
                ("service_name", "Service", f"label_values(caretaker_service_processes{{{HOST}}}, service_name)")):
            templating.append({
                "name": name, "label": label, "type": "query", "datasource": DS,
                "query": {"query": query, "refId": name}, "definition": query, "includeAll": True,
                "allValue": ".*", "multi": True, "refresh": 2, "current": {"text": "All", "value": "$__all"}})
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": ["caretaker"],
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"}, "timezone": "browser",
            "templating": {"list": templating}, "annotations": {"list": []}, "panels": self.panels,
        }


def overview() -> Board:
    b = Board("caretaker-overview", "caretaker / Overview", "Every host and every watched service at a glance.")
    b.panel("Health per host", "bargauge", [(f"min by (host) (caretaker_service_health_ratio{{{SVC}}})", "{{host}}")],
            unit="percentunit", w=8, defaults={"min": 0, "max": 1},
            description="The health of each host's least healthy service, 0-1.")
    b.panel("caretaker up per host", "stat", [(
        f'up{{job=~"caretaker-exporter|caretaker-receiver",{HOST}}}', "{{host}} {{job}} {{instance}}")],
        w=8, defaults={"min": 0, "max": 1},
        description="1 when Prometheus scrapes the host's exporter and receiver: 0 is a host nothing watches or "
                    "repairs.")
    b.panel("Open problems per host", "bargauge", [(f"sum by (host) (caretaker_problems_open{{{SVC}}})", "{{host}}")],
            w=8, description="Firing repair alerts the host's receiver works on now.")
    b.panel("Health", "bargauge", [(f"caretaker_service_health_ratio{{{SVC}}}", "{{service_name}}")],
            unit="percentunit", defaults={"min": 0, "max": 1}, description="Composite health, 0-1.")
    b.panel("Processes running / expected minimum", "timeseries", [
        (f"caretaker_service_processes{{{SVC}}}", "{{service_name}} running"),
        (f"caretaker_service_min_processes{{{SVC}}}", "{{service_name}} min")])
    b.panel("Probe latency", "timeseries", [(f"caretaker_probe_duration_seconds{{{SVC}}}",
                                             "{{service_name}} {{probe}}")], unit="s")
    b.panel("Probes passing", "timeseries", [(f"caretaker_probe_success{{{SVC}}}", "{{service_name}} {{probe}}")],
            defaults={"min": 0, "max": 1})
    b.panel("Heartbeat age", "timeseries", [
        (f"service_name:caretaker_heartbeat_age_seconds{{{SVC}}}", "{{service_name}} {{heartbeat}}"),
        (f"caretaker_heartbeat_timeout_seconds{{{SVC}}}", "{{heartbeat}} timeout")], unit="s")
    b.panel("Log error lines per second", "timeseries", [(
        f"sum by (host, service_name) (rate(caretaker_log_pattern_matches_total{{{SVC}}}[$__rate_interval]))",
        "{{service_name}}")], unit="short")
    b.panel("Repairs (last hour)", "timeseries", [(
        f"service_name:caretaker_remediations:increase1h{{{SVC}}}", "{{service_name}} {{action}} {{result}}")])
    b.panel("Resident memory", "timeseries", [(f"caretaker_service_resident_memory_bytes{{{SVC}}}",
                                               "{{service_name}}")], unit="bytes")
    return b


def service() -> Board:
    b = Board("caretaker-service", "caretaker / Service", "One service in depth: pick it above.")
    b.panel("Health parts", "timeseries", [
        (f"caretaker_service_health_ratio{{{SVC}}}", "{{service_name}} health"),
        (f"caretaker_service_health_component_ratio{{{SVC}}}", "{{service_name}} {{component}}")],
        unit="percentunit", w=24)
    b.panel("Processes by status", "timeseries", [(f"caretaker_service_processes_by_status{{{SVC}}} > 0",
                                                   "{{service_name}} {{status}}")])
    b.panel("CPU (cores)", "timeseries", [(f"service_name:caretaker_service_cpu_seconds:rate1m{{{SVC}}}",
                                           "{{service_name}}")])
    b.panel("Resident memory and limit", "timeseries", [
        (f"caretaker_service_resident_memory_bytes{{{SVC}}}", "{{service_name}}"),
        (f"caretaker_service_memory_limit_bytes{{{SVC}}}", "{{service_name}} limit")], unit="bytes")
    b.panel("Open file descriptors", "timeseries", [(f"caretaker_service_open_fds{{{SVC}}}", "{{service_name}}")])
    b.panel("Probe latency", "timeseries", [(f"caretaker_probe_duration_seconds{{{SVC}}}",
                                             "{{service_name}} {{probe}}")], unit="s")
    b.panel("Probe failure reasons", "timeseries", [(f"caretaker_probe_failure_reason{{{SVC}}} == 1",
                                                     "{{probe}}: {{reason}}")])
    b.panel("Log lines by pattern (per second)", "timeseries", [(
        f"sum by (host, service_name, pattern) (rate(caretaker_log_pattern_matches_total{{{SVC}}}[$__rate_interval]))",
        "{{service_name}} {{pattern}}")])
    b.panel("Heartbeat age", "timeseries", [
        (f"service_name:caretaker_heartbeat_age_seconds{{{SVC}}}", "{{heartbeat}}")], unit="s")
    b.panel("Files: valid, fresh", "table", [
        (f"caretaker_file_valid{{{SVC}}}", "{{path}} valid"),
        (f"time() - caretaker_file_mtime_timestamp_seconds{{{SVC}}}", "{{path}} age")])
    b.panel("Free space on data paths", "timeseries", [(
        f"service_name:caretaker_filesystem_avail:ratio{{{SVC}}}", "{{service_name}} {{path}}")],
        unit="percentunit")
    b.panel("Port conflicts", "timeseries", [(f"caretaker_service_port_conflict{{{SVC}}}",
                                              "{{service_name}} :{{port}}")])
    b.panel("Repairs (last hour)", "timeseries", [(
        f"service_name:caretaker_remediations:increase1h{{{SVC}}}", "{{action}} {{result}}")])
    b.panel("Work claims by state", "timeseries", [
        (f"caretaker_claims{{{SVC}}}", "{{service_name}} {{state}}"),
        (f"sum by (host, service_name) (increase(caretaker_claims_scan_errors_total{{{SVC}}}[$__rate_interval])) > 0",
         "{{service_name}} scan errors")],
        description="Items claimed in Redis (claims:): active, orphaned (the owner is gone; release_claims gives "
                    "them back), invalid (cannot be judged); and failed scans.")
    return b


def repairs() -> Board:
    b = Board("caretaker-repairs", "caretaker / Repairs", "What the receiver did, and what it refused to do.")
    b.panel("Repairs by result", "timeseries", [(
        f"sum by (host, service_name, action, result) (increase(caretaker_remediations_total{{{SVC}}}"
        "[$__rate_interval]))",
        "{{service_name}} {{action}} {{result}}")])
    b.panel("Repair duration (p50, p95)", "timeseries", [
        (f"histogram_quantile(0.5, sum by (host, le, action) "
         f"(rate(caretaker_remediation_duration_seconds_bucket{{{HOST}}}[$__rate_interval])))",
         "{{host}} {{action}} p50"),
        (f"histogram_quantile(0.95, sum by (host, le, action) "
         f"(rate(caretaker_remediation_duration_seconds_bucket{{{HOST}}}[$__rate_interval])))",
         "{{host}} {{action}} p95")], unit="s")
    b.panel("Attempt budget exhausted", "stat", [(f"caretaker_remediation_attempts_exhausted{{{SVC}}}",
                                                  "{{service_name}}")], defaults={"min": 0, "max": 1})
    b.panel("Repairs in progress", "stat", [(f"sum by (host) (caretaker_remediations_in_progress{{{HOST}}})",
                                             "{{host}} in progress")])
    b.panel("Webhook requests by status code", "timeseries", [(
        f"sum by (host, code) (rate(caretaker_webhook_requests_total{{{HOST}}}[$__rate_interval]))", "HTTP {{code}}")],
        unit="reqps")
    b.panel("Alerts received", "timeseries", [(
        f"sum by (host, status) (rate(caretaker_alerts_received_total{{{HOST}}}[$__rate_interval]))", "{{status}}")],
        unit="short")
    b.panel("Alerts not acted on, by reason", "timeseries", [(
        f"sum by (host, reason) (increase(caretaker_alerts_skipped_total{{{SVC}}}[$__rate_interval])) > 0",
        "{{reason}}")], w=24,
        description="other_host or no_host: alerts routed to the wrong receiver, or without a host label "
                    "(docs/fleet.md).")
    return b


BOARDS = {"overview": overview, "service": service, "repairs": repairs}

CORE = {
    "overview": ["Health per host", "caretaker up per host", "Open problems per host", "Health",
                 "Processes running / expected minimum", "Probe latency", "Probes passing",
                 "Heartbeat age", "Log error lines per second", "Repairs (last hour)", "Resident memory"],
    "service": ["Health parts", "CPU (cores)", "Resident memory and limit", "Open file descriptors",
                "Probe latency", "Heartbeat age", "Files: valid, fresh", "Free space on data paths", "Port conflicts"],
    "repairs": ["Repairs by result", "Attempt budget exhausted", "Repairs in progress",
                "Webhook requests by status code", "Alerts received"],
}
"""Panels that must return data against a running stack (tests/test_e2e.py)."""


def queries(variables: Mapping[str, str]) -> Iterator[tuple[str, str, list[str]]]:
    """``(board, panel title, its queries)`` of every dashboard in ``OUT``, with the
    template variables (``{"host": ".*", "service_name": ".*"}``) and Grafana's own
    (``$__rate_interval`` 1m, ``$__range`` 1h) filled in, ready for Prometheus's API."""
    fixed = {**{f"${k}": v for k, v in variables.items()}, "$__rate_interval": "1m", "$__range": "1h"}
    for path in sorted(OUT.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs = []
            for target in panel["targets"]:
                expr = target["expr"]
                for name in sorted(fixed, key=len, reverse=True):  # $__rate_interval before a shorter name
                    expr = expr.replace(name, fixed[name])
                exprs.append(expr)
            yield path.stem, panel["title"], exprs


def render() -> dict[str, str]:
    return {f"{name}.json": json.dumps(make().json(), indent=2) + "\n" for name, make in BOARDS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python grafana/generate.py", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
