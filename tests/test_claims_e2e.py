"""End to end: a worker killed in the middle of a job, through the real Prometheus and
Alertmanager with the shipped rules and routes, caretaker's exporter and receiver as
separate processes (demo/stack.py), and a real Redis the worker takes its jobs from.

The receiver restarts the worker (CaretakerServiceDown), and once the dead worker's
heartbeat has expired, releases its job (CaretakerClaimsOrphaned -> release_claims); the
new worker takes it from the queue and finishes it, once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from demo.stack import Stack
from exporter.procfs import ProcReader, scan_services

from .claims_util import WORKER
from .helpers import free_port, log_tails, receiver_audit, require_binary, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_a_worker_killed_mid_job_gets_its_job_done_by_the_next_one(tmp_path: Path, redis_server: Any) -> None:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    redis_port = free_port()
    redis_server(redis_port)
    ports = {name: free_port() for name in ("exporter", "receiver", "prometheus", "alertmanager")}
    tag = f"e2e-{redis_port}"
    config = {
        "exporter": {"port": ports["exporter"]},
        "receiver": {"port": ports["receiver"], "bearer_token": {"file": "secrets/token"},
                     "state_file": "state.sqlite", "cooldown": "2s"},
        "services": {"worker": {
            "match": {"cmdline": f"claims_worker\\.py --tag {tag} "},
            "start": {"argv": [sys.executable, str(WORKER), "--tag", tag, "--ttl", "2"],
                      "env": {"CARETAKER_CLAIMS_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
                      "log_file": "logs/worker.log"},
            "stop": {"grace_period": "2s"},
            "claims": {"port": redis_port},
            "remediation": {"allow": ["restart", "release_claims"], "verify_timeout": "15s"},
        }},
    }
    path = tmp_path / "caretaker.yml"
    path.write_text(yaml.safe_dump(config))
    stack = Stack(path, tmp_path / "run", prometheus_port=ports["prometheus"],
                  alertmanager_port=ports["alertmanager"],
                  alertmanager_overrides={"group_interval": "1s", "repeat_interval": "2s"})
    r = redis.Redis(port=redis_port, decode_responses=True)
    try:
        stack.start()
        stack.wait_ready()
        assert stack.token_path is not None
        token = stack.token_path.read_text().strip()
        r.hset("issue:e2e-1", "seconds", "120")
        r.lpush("task_queue", "e2e-1")
        wait_for(lambda: r.get("started:e2e-1") == "1", 30, 0.1, what="the worker to start the job")
        (old,) = scan_services(ProcReader(), stack.config.services, (os.getpid(),))["worker"]
        killed_at = time.time()
        os.kill(old.pid, signal.SIGKILL)
        r.hset("issue:e2e-1", "seconds", "0.2")  # the next run is quick
        wait_for(lambda: r.lrange("finished", 0, -1) == ["e2e-1"], 120, 0.2,
                 what="the job to be released and finished by the restarted worker")
        time.sleep(3)  # resends meanwhile; nothing more may happen
        acted = [e for e in receiver_audit(stack.config.receiver.port, token)
                 if e["decision"] == "acted" and e["received_at"] >= killed_at]
        releases = [e for e in acted if e["action"] == "release_claims"]
        assert len(releases) == 1, releases
        (entry,) = releases
        assert entry["alertname"] == "CaretakerClaimsOrphaned" and entry["result"] == "success"
        assert entry["observation"]["holds"] is True
        assert next(s for s in entry["steps"] if "released" in s)["released"] == ["e2e-1"]
        assert [e["alertname"] for e in acted if e["action"] == "restart"] == ["CaretakerServiceDown"]
        assert (r.get("started:e2e-1"), r.get("done:e2e-1")) == ("2", "1")
        assert r.lrange("finished", 0, -1) == ["e2e-1"]
        assert r.smembers("processing_issues") == set() and r.llen("task_queue") == 0
        (new,) = scan_services(ProcReader(), stack.config.services, (os.getpid(),))["worker"]
        assert new.pid != old.pid
        print(f"worker killed -> job released in {entry['finished_at'] - killed_at:.1f}s")
    finally:
        stack.stop()
        log_tails(sorted((tmp_path / "run" / "logs").glob("*.log")))
