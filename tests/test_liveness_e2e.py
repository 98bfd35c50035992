"""End to end: a worker whose loop deadlocks while its process and threads live, through
the real Prometheus and Alertmanager with the shipped rules and routes, caretaker's
exporter and receiver as separate processes (demo/stack.py).

Its heartbeat goes stale, Prometheus fires ``CaretakerHeartbeatMissing``, the receiver
confirms it and restarts the worker, and the restart is verified by a heartbeat the new
worker fed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo.stack import Stack
from exporter.procfs import ProcReader, scan_services

from .helpers import DEADLOCKING_WORKER, REPO, free_port, log_tails, receiver_audit, require_binary, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def firing(stack: Stack, alertname: str) -> bool:
    url = f"http://127.0.0.1:{stack.prometheus_port}/api/v1/alerts"
    with urllib.request.urlopen(url, timeout=5) as resp:
        alerts = json.load(resp)["data"]["alerts"]
    return any(a["labels"]["alertname"] == alertname and a["state"] == "firing" for a in alerts)


def test_a_deadlocked_worker_is_found_by_its_heartbeat_restarted_and_verified_by_the_new_one(tmp_path: Path) -> None:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    only = tmp_path / "client-only"
    shutil.copytree(REPO / "caretaker_client", only / "caretaker_client")
    (tmp_path / "ready-after").write_text("0")
    flag, marker = tmp_path / "deadlock", f"lv-e2e-{uuid.uuid4().hex[:12]}"
    ports = {name: free_port() for name in ("exporter", "receiver", "prometheus", "alertmanager")}
    config = {
        "exporter": {"port": ports["exporter"]},
        "receiver": {"port": ports["receiver"], "bearer_token": {"file": "secrets/token"},
                     "state_file": "state.sqlite", "cooldown": "2s"},
        "services": {"worker": {
            "match": {"cmdline": f"{marker}$"},
            "processes": {"min": 1, "max": 1},
            "start": {"argv": [sys.executable, "-S", "-c", DEADLOCKING_WORKER, str(flag),
                               str(tmp_path / "ready-after"), "0.2", marker],
                      "env": {"PYTHONPATH": str(only),
                              "CARETAKER_EXPORTER_URL": f"http://127.0.0.1:{ports['exporter']}"},
                      "log_file": "logs/worker.log"},
            "stop": {"grace_period": "2s"},
            "heartbeats": [{"name": "worker", "timeout": "2s"}],
            "remediation": {"allow": ["restart"], "verify_timeout": "15s"},
        }},
    }
    path = tmp_path / "caretaker.yml"
    path.write_text(yaml.safe_dump(config))
    stack = Stack(path, tmp_path / "run", prometheus_port=ports["prometheus"],
                  alertmanager_port=ports["alertmanager"],
                  alertmanager_overrides={"group_interval": "1s", "repeat_interval": "2s"})

    def workers() -> list[Any]:
        return scan_services(ProcReader(), stack.config.services, (os.getpid(),))["worker"]

    log = tmp_path / "logs" / "worker.log"  # log_file is relative to the config
    try:
        stack.start()
        stack.wait_ready()
        assert stack.token_path is not None
        token = stack.token_path.read_text().strip()
        wait_for(lambda: log.exists() and "first beat" in log.read_text(), 30, 0.1, what="the worker's first job")
        time.sleep(3)  # a few scrapes of a fresh heartbeat: nothing fires, nothing is done
        assert not firing(stack, "CaretakerHeartbeatMissing")
        assert [e for e in receiver_audit(stack.config.receiver.port, token) if e["decision"] == "acted"] == []
        (old,) = workers()
        deadlocked_at = time.time()
        flag.touch()
        wait_for(lambda: f"pid {old.pid} deadlocks" in log.read_text(), 10, 0.1, what="the deadlock")
        status = Path(f"/proc/{old.pid}/status").read_text()
        assert "\nThreads:\t1\n" not in status  # alive, with its threads: only the heartbeat tells

        def restarted() -> list[dict[str, Any]]:
            return [e for e in receiver_audit(stack.config.receiver.port, token)
                    if e["decision"] == "acted" and e["result"]]
        wait_for(restarted, 90, 0.2, what="a restart for the deadlocked worker")
        time.sleep(3)  # resends meanwhile; nothing more may happen
        (entry,) = restarted()
        assert (entry["alertname"], entry["action"], entry["result"]) == ("CaretakerHeartbeatMissing", "restart",
                                                                          "success"), entry
        assert entry["received_at"] >= deadlocked_at + 2  # not before its heartbeat was late
        assert entry["observation"]["holds"] is True
        (new,) = workers()
        assert new.pid != old.pid and ProcReader().stat(old.pid) is None  # gone, or a zombie not yet reaped
        (fresh,) = [s for s in entry["steps"] if s["message"].startswith("heartbeat worker fresh")]
        assert fresh["pid"] == new.pid, fresh
        assert entry["steps"][-1]["message"].startswith("verified")
        print(f"worker deadlocked -> restarted and verified in {entry['finished_at'] - deadlocked_at:.1f}s")
    finally:
        stack.stop()
        log_tails([*sorted((tmp_path / "run" / "logs").glob("*.log")), log])
