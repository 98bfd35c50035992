"""End to end: the real Redis, Prometheus and Alertmanager on loopback, the shipped rules
and Alertmanager config, caretaker's exporter and receiver as separate processes.

Alertmanager's repeat_interval is shortened to 2s so it resends firing alerts all the
time: "exactly one restart" then also proves that resends are deduplicated.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import yaml

from demo.stack import Stack
from exporter.config import Config
from exporter.procfs import ProcReader, scan_services

from .helpers import REPO, core_panels_without_data, free_port, log_tails, require_binary, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class Env:
    def __init__(self, stack: Stack, ports: dict[str, int], token: str) -> None:
        self.stack = stack
        self.config: Config = stack.config
        self.ports = ports
        self.token = token

    def get(self, url: str, auth: bool = False) -> Any:
        req = urllib.request.Request(url)
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)

    def audit(self, service: str | None = None) -> list[dict[str, Any]]:
        query = f"?limit=200{'&service_name=' + service if service else ''}"
        data: list[dict[str, Any]] = self.get(
            f"http://127.0.0.1:{self.config.receiver.port}/api/v1/remediations{query}", auth=True)["data"]
        return data

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = (f"http://127.0.0.1:{self.stack.prometheus_port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        result: list[dict[str, Any]] = self.get(url)["data"]["result"]
        return result

    def processes(self, service: str) -> list[Any]:
        return scan_services(ProcReader(), {service: self.config.services[service]}, (os.getpid(),))[service]

    def post_receiver(self, payload: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.config.receiver.port}/alerts",
                                     data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            result: dict[str, Any] = json.load(resp)
        return result

    def post_alertmanager(self, alerts: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.stack.alertmanager_port}/api/v2/alerts",
                                     data=json.dumps(alerts).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    redis_bin = require_binary("redis-server")
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    tmp = tmp_path_factory.mktemp("e2e")
    ports = {name: free_port() for name in ("redis", "webapp", "exporter", "receiver", "prometheus", "alertmanager")}
    config = {
        "exporter": {"port": ports["exporter"]},
        "receiver": {"port": ports["receiver"], "bearer_token": {"file": "secrets/token"},
                     "state_file": "state.sqlite", "cooldown": "2s"},
        "services": {
            "redis": {
                "match": {"comm": "^redis-server$", "cmdline": f":{ports['redis']}\\b"},
                "probes": [{"name": "port", "type": "tcp", "port": ports["redis"], "timeout": "1s"}],
                "start": {"argv": [redis_bin, "--bind", "127.0.0.1", "--port", str(ports["redis"]), "--save", "",
                                   "--appendonly", "no", "--dir", str(tmp)], "log_file": "logs/redis.log"},
                "stop": {"grace_period": "5s"},
                "remediation": {"allow": ["restart"], "verify_timeout": "15s"},
                "ports": [ports["redis"]],
                "data_paths": [str(tmp)],
                "limits": {"memory_bytes": 2**30, "open_fds": 10000},
            },
            "webapp": {
                "match": {"cmdline": f"webapp\\.py --port {ports['webapp']} --heartbeat webapp-loop$"},
                "probes": [{"name": "health", "type": "http", "url": f"http://127.0.0.1:{ports['webapp']}/health",
                            "timeout": "1s"}],
                "start": {"argv": [sys.executable, str(REPO / "demo" / "webapp.py"), "--port", str(ports["webapp"]),
                                   "--heartbeat", "webapp-loop"],
                          "env": {"CARETAKER_EXPORTER_URL": f"http://127.0.0.1:{ports['exporter']}"},
                          "log_file": "logs/webapp.log"},
                "stop": {"grace_period": "2s"},
                "remediation": {"allow": ["restart"], "verify_timeout": "15s"},
                "heartbeats": [{"name": "webapp-loop", "timeout": "1h"}],
                "logs": [{"path": "logs/webapp.log"}],
                "files": [{"path": "state.json", "format": "json"}],
            },
        },
    }
    (tmp / "state.json").write_text('{"ok": true}')
    path = tmp / "caretaker.yml"
    path.write_text(yaml.safe_dump(config))
    stack = Stack(path, tmp / "run", prometheus_port=ports["prometheus"], alertmanager_port=ports["alertmanager"],
                  alertmanager_overrides={"group_interval": "1s", "repeat_interval": "2s"})
    try:
        stack.start()
        stack.wait_ready()
        assert stack.token_path is not None
        e = Env(stack, ports, stack.token_path.read_text().strip())
        wait_for(lambda: len(e.query('up{job=~"caretaker-exporter|caretaker-receiver"} == 1')) == 2, 30, 0.2,
                 what="Prometheus scraping both caretaker programs")
        wait_for(lambda: len(e.query("caretaker_service_health_ratio == 1")) == 2, 30, 0.2,
                 what="both services healthy in Prometheus (the webapp's loop beating its heartbeat)")
        yield e
    finally:
        stack.stop()
        log_tails(sorted((tmp / "run" / "logs").glob("*.log")))


def acted_since(env: Env, service: str, since: float) -> list[dict[str, Any]]:
    return [e for e in env.audit(service) if e["decision"] == "acted" and e["received_at"] >= since]


def test_metrics_reach_prometheus_with_service_labels(env: Env) -> None:
    # Waited for, not queried once: one late scrape (over the 1 s timeout) leaves a gap.
    def processes() -> dict[str, str]:
        return {r["metric"]["service_name"]: r["value"][1] for r in env.query("caretaker_service_processes")}
    wait_for(lambda: processes() == {"redis": "1", "webapp": "1"}, 15, 0.5, what="both services' process counts")
    wait_for(lambda: env.query('up{job="caretaker-receiver"} == 1'), 15, 0.5, what="the receiver's target up")


def test_redis_killed_with_sigkill_is_restarted_exactly_once(env: Env) -> None:
    (old,) = env.processes("redis")
    broken_at = time.time()
    os.kill(old.pid, signal.SIGKILL)
    wait_for(lambda: any(e["result"] == "success" for e in acted_since(env, "redis", broken_at)), 60, 0.2,
             what="a successful restart of redis in the audit trail")
    client = redis.Redis(host="127.0.0.1", port=env.ports["redis"], socket_timeout=2)
    assert client.ping() is True
    client.close()
    time.sleep(6)  # Alertmanager resends every 2s meanwhile; the alert also resolves
    acted = acted_since(env, "redis", broken_at)
    assert len(acted) == 1, acted
    (entry,) = acted
    assert entry["alertname"] == "CaretakerServiceDown"
    assert any(m["message"].startswith("started ") for m in entry["steps"])
    (new,) = env.processes("redis")
    assert new.pid != old.pid
    print(f"redis healed: broken -> repaired in {entry['finished_at'] - broken_at:.2f}s")


def test_frozen_webapp_is_confirmed_continued_stopped_and_restarted(env: Env) -> None:
    (old,) = env.processes("webapp")
    broken_at = time.time()
    os.kill(old.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: any(e["result"] == "success" for e in acted_since(env, "webapp", broken_at)), 90, 0.2,
                 what="a successful restart of the frozen webapp")
    finally:
        if env.processes("webapp") and env.processes("webapp")[0].pid == old.pid:
            os.kill(old.pid, signal.SIGCONT)
    (entry,) = acted_since(env, "webapp", broken_at)
    assert entry["alertname"] == "CaretakerProbeFailing"
    assert entry["observation"]["holds"] is True  # confirmed: the probe failed every time
    messages = [s["message"] for s in entry["steps"]]
    found = next(s for s in entry["steps"] if s["message"].startswith("found"))
    assert [p["state"] for p in found["processes"]] == ["T"], "the evidence shows the process was stopped"
    term = messages.index(next(m for m in messages if m.startswith("SIGTERM")))
    assert messages[term + 1].startswith("SIGCONT")  # so it can act on SIGTERM at once
    assert not any("SIGKILL" in m for m in messages)
    assert messages[-1].startswith("verified")
    # verified only once the new incarnation's serving loop had beaten its heartbeat
    assert messages[-2].startswith("heartbeat webapp-loop fresh after"), messages
    with urllib.request.urlopen(f"http://127.0.0.1:{env.ports['webapp']}/health", timeout=2) as resp:
        health = json.load(resp)
    assert health["status"] == "ok" and health["pid"] != old.pid
    assert entry["steps"][-2]["pid"] == health["pid"]  # the heartbeat came from the new process
    print(f"webapp healed: frozen -> repaired in {entry['finished_at'] - broken_at:.2f}s")


def test_duplicate_notifications_and_alertmanager_resends_cause_no_second_restart(env: Env) -> None:
    # 1. A replay of a notification the receiver has already acted on.
    (done,) = [e for e in env.audit("redis") if e["decision"] == "acted"][-1:]
    replay = {"version": "4", "status": "firing", "receiver": "caretaker", "groupKey": "{}", "alerts": [{
        "status": "firing", "labels": {"alertname": done["alertname"], "service_name": "redis",
                                       "remediation": "restart"},
        "annotations": {}, "startsAt": done["starts_at"], "fingerprint": done["fingerprint"]}]}
    assert env.post_receiver(replay)["duplicates"] == 1

    # 2. Alertmanager itself resending a firing alert (repeat_interval 2s) for 8 seconds.
    since = time.time()
    starts = datetime.now(UTC)
    alert = {"labels": {"alertname": "CaretakerE2EResend", "service_name": "redis", "remediation": "restart",
                        "severity": "critical"},
             "annotations": {"summary": "resend test"}, "startsAt": starts.isoformat(),
             "endsAt": (starts + timedelta(seconds=60)).isoformat()}
    env.post_alertmanager([alert])
    wait_for(lambda: any(e["alertname"] == "CaretakerE2EResend" and e["times_seen"] >= 3 for e in env.audit("redis")),
             30, 0.2, what="Alertmanager to resend the alert at least twice")
    entries = [e for e in env.audit("redis") if e["alertname"] == "CaretakerE2EResend"]
    assert len(entries) == 1, entries
    assert len(acted_since(env, "redis", since)) == 1
    env.post_alertmanager([{**alert, "endsAt": datetime.now(UTC).isoformat()}])
    wait_for(lambda: any(e["alertname"] == "CaretakerE2EResend" and e["status"] == "resolved"
                         for e in env.audit("redis")), 30, 0.2, what="the resolved notification")
    assert len(acted_since(env, "redis", since)) == 1, "a resolved alert is recorded, not acted on"


def test_every_dashboard_query_parses_and_core_panels_have_data(env: Env) -> None:
    """Runs last: by now the receiver has had requests and repairs to show."""
    values = env.get(f"http://127.0.0.1:{env.stack.prometheus_port}/api/v1/label/service_name/values?"
                     + urllib.parse.urlencode({"match[]": "caretaker_service_processes"}))["data"]
    assert set(values) == {"redis", "webapp"}  # the dashboards' service_name variable
    empty_core = core_panels_without_data(env.query, {"service_name": ".*", "host": ".*"})
    assert not empty_core, f"core panels without data: {empty_core}"
