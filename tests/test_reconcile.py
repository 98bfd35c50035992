"""The repair model with real processes: problems, confirmation, retries, dependencies,
pauses (docs/design.md, "The repair model: level-triggered")."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.app import EXECUTOR_KEY, REGISTRY_KEY
from receiver.process import start_service
from receiver.store import NewAlert, Store

from .helpers import (
    AUTH,
    AUTH_TOKEN,
    HOLDS_ON_TERM,
    REPO,
    Client,
    MakeConfig,
    ManualClock,
    alert,
    audit,
    free_port,
    kill_child,
    notification,
    pids,
    port_open,
    post_alerts,
    process_state,
    receiver_with_clock,
    require_binary,
    settle,
    signal_caught,
    sleeper,
    stop_services,
    wait_audit,
    wait_until,
)

FAILS_FIRST_START = ("import os, sys, time\n"
                     "flag = sys.argv[1]\n"
                     "if not os.path.exists(flag):\n"
                     "    open(flag, 'w').close()\n"
                     "    print('cannot start: first try fails', flush=True)\n"
                     "    sys.exit(3)\n"
                     "while True: time.sleep(1)\n")
HTTP_SERVER = ("import http.server, sys\n"
               "class H(http.server.BaseHTTPRequestHandler):\n"
               "    def do_GET(self):\n"
               "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
               "    def log_message(self, *a): pass\n"
               "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")


@pytest.fixture
def config_for(make_config: MakeConfig) -> MakeConfig:
    """The configs of this module: the receiver's token, and a waiting problem looked at
    again every 200 ms (not 1 s, doubling), so that a test waits for a look no longer."""
    return functools.partial(make_config, token=True, recheck_interval="200ms")


async def stepped(client: Client, service: str, prefix: str) -> bool:
    """A repair of ``service`` (done or running) has taken a step whose message starts with ``prefix``."""
    return any(s["message"].startswith(prefix) for e in await audit(client, service_name=service) for s in e["steps"])


def firing(entries: list[dict[str, Any]], service: str | None = None) -> list[dict[str, Any]]:
    return [e for e in entries if e["status"] == "firing" and service in (None, e["service_name"])]


async def test_a_failed_repair_is_tried_again_until_the_service_is_healthy(tmp_path: Path,
                                                                          config_for: MakeConfig) -> None:
    flag = tmp_path / "started-once"
    config = config_for({"svc": sleeper(FAILS_FIRST_START, str(flag))}, cooldown="10m")
    clock = ManualClock()  # ten minutes pass when the test says so
    async with receiver_with_clock(config, clock) as client:
        executor = client.server.app[EXECUTOR_KEY]
        await post_alerts(client, alert("f1", service_name="svc", remediation="restart"))  # one alert, never resent
        entries = await wait_audit(client, lambda es: any(e["reason"] == "cooldown" for e in es))
        waited, first = firing(entries)
        assert waited["observation"]["next_attempt_at"] == pytest.approx(first["finished_at"] + 600)
        clock.advance(599)
        executor.wake("svc")  # the worker looks again now (it would in a second of real time)
        assert len(firing(await settle(client))) == 2  # one second short: no attempt, and the wait is not said again
        clock.advance(1)
        executor.wake("svc")
        entries = await wait_audit(client, lambda es: any(e["result"] == "success" for e in es))
        second, waited, first = firing(entries)
        assert (waited["decision"], waited["reason"]) == ("skipped", "cooldown")  # the wait is said, once
        assert (first["decision"], first["result"]) == ("acted", "failure")
        assert "exited with status 3" in first["steps"][-1]["message"]
        assert "first try fails" in first["steps"][-1]["message"]  # the tail of the service's own log
        assert (second["decision"], second["result"], second["problem_id"]) == ("acted", "success", 1)
        assert second["started_at"] >= first["finished_at"] + 600  # the cooldown was kept
        assert len(pids(config, "svc")) == 1


async def test_a_stale_alert_for_a_healthy_service_stops_nothing(receiver_for: Any, config_for: MakeConfig) -> None:
    config = config_for({"svc": sleeper()})
    child = start_service(config, "svc")
    try:
        await wait_until(lambda: pids(config, "svc") == [child.pid], 10, what="service up")
        client = await receiver_for(config)
        await post_alerts(client, alert("late", service_name="svc", remediation="restart"))
        (entry,) = await wait_audit(client, lambda es: es and es[0]["reason"])
        assert (entry["decision"], entry["reason"]) == ("skipped", "condition_cleared")
        assert entry["observation"]["processes"] == 1 and entry["observation"]["holds"] is False
        assert entry["steps"] == []
        await asyncio.sleep(0.5)  # it keeps looking while the problem is open, and still stops nothing
        assert pids(config, "svc") == [child.pid]
        assert len(await settle(client)) == 1  # the same decision is not written again
    finally:
        await kill_child(child)


async def test_redis_killed_under_a_web_app_that_depends_on_it(receiver_for: Any, tmp_path: Path,
                                                               config_for: MakeConfig) -> None:
    """One Redis restart; the web app, whose probe fails while Redis is down, is neither
    restarted nor charged, and is healthy afterwards."""
    binary = require_binary("redis-server")
    redis_port = free_port()
    config = config_for({
        "redis": {"match": {"comm": "^redis-server$", "cmdline": f":{redis_port}\\b"},
                  "probes": [{"name": "port", "type": "tcp", "port": redis_port, "timeout": "500ms"}],
                  "start": {"argv": [binary, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                                     "--appendonly", "no", "--dir", str(tmp_path)]},
                  "stop": {"grace_period": 2}, "remediation": {"allow": ["restart"], "verify_timeout": 10}},
        "web": sleeper(depends_on=["redis"],
                       probes=[{"name": "redis", "type": "tcp", "port": redis_port, "timeout": "500ms"}]),
    }, confirm={"probe_failures": 2, "interval": "100ms", "window": "1s"})
    redis_child = start_service(config, "redis")
    web_child = start_service(config, "web")
    try:
        await wait_until(lambda: port_open(redis_port) and len(pids(config, "web")) == 1, 10, what="both up")
        client = await receiver_for(config)
        await kill_child(redis_child)
        # Both alerts arrive together; the web app's is first in the notification.
        await post_alerts(client, alert("w1", alertname="CaretakerProbeFailing", service_name="web", probe="redis",
                                        remediation="restart"),
                          alert("r1", service_name="redis", remediation="restart"))
        entries = await wait_audit(client, lambda es: any(e["service_name"] == "redis" and e["result"] == "success"
                                                          for e in es)
                                   and any(e["reason"] == "condition_cleared" for e in es))
        web = firing(entries, "web")
        assert [e["decision"] for e in web].count("acted") == 0
        assert {e["reason"] for e in web} <= {"dependency_unhealthy", "condition_cleared"}
        assert pids(config, "web") == [web_child.pid]  # never restarted
        assert [e["result"] for e in firing(entries, "redis")] == ["success"]  # one Redis restart
        executor = client.server.app[EXECUTOR_KEY]
        assert await executor.db(executor.store.repairs_since, "web", 0) == 0  # no budget spent
        assert port_open(redis_port)
    finally:
        for child in (redis_child, web_child):
            await kill_child(child)


async def test_a_paused_service_is_not_started_until_resumed(receiver_for: Any, config_for: MakeConfig) -> None:
    config = config_for({"svc": sleeper()})
    client = await receiver_for(config)
    resp = await client.post("/api/v1/services/svc/pause", json={"reason": "upgrading it by hand"}, headers=AUTH)
    assert resp.status == 200 and (await resp.json())["paused_until"] is None
    assert (await client.post("/api/v1/services/svc/pause", json={"duration": "soon"}, headers=AUTH)).status == 400
    assert (await client.post("/api/v1/services/ghost/pause", headers=AUTH)).status == 404
    await post_alerts(client, alert("p1", service_name="svc", remediation="restart"))
    (entry,) = await wait_audit(client, lambda es: es and es[0]["reason"])
    assert (entry["decision"], entry["reason"]) == ("skipped", "paused")
    await asyncio.sleep(0.5)  # a while in which its worker looks again, and still starts nothing
    assert pids(config, "svc") == []
    resp = await client.get("/metrics")
    assert 'caretaker_service_paused{service_name="svc"} 1.0' in await resp.text()
    resp = await client.post("/api/v1/services/svc/resume", headers=AUTH)
    assert (await resp.json())["was_paused"] is True
    entries = await wait_audit(client, lambda es: any(e["result"] == "success" for e in es))
    assert entries[0]["problem_id"] == 1 and len(pids(config, "svc")) == 1


async def test_a_probe_failing_for_auth_is_escalated_not_restarted(receiver_for: Any, tmp_path: Path, redis_port: int,
                                                                   config_for: MakeConfig) -> None:
    (tmp_path / "wrong-password").write_text("not-the-password\n")
    await asyncio.to_thread(subprocess.run, ["redis-cli", "-p", str(redis_port), "CONFIG", "SET", "requirepass",
                                             "changed-at-runtime"], check=True, capture_output=True, timeout=10)
    config = config_for({"svc": sleeper(probes=[
        {"name": "ping", "type": "redis", "port": redis_port, "password": {"file": "wrong-password"},
         "timeout": "1s"}])}, confirm={"probe_failures": 2, "interval": "100ms", "window": "1s"})
    child = start_service(config, "svc")
    try:
        await wait_until(lambda: pids(config, "svc") == [child.pid], 10, what="service up")
        client = await receiver_for(config)
        await post_alerts(client, alert("a1", alertname="CaretakerProbeFailing", service_name="svc", probe="ping",
                                        remediation="restart"))
        (entry,) = await wait_audit(client, lambda es: es and es[0]["reason"])
        assert (entry["decision"], entry["reason"]) == ("skipped", "escalated")
        assert entry["observation"]["escalate"] == "probe_auth"
        assert pids(config, "svc") == [child.pid]
    finally:
        await kill_child(child)


async def test_an_interrupted_repair_of_a_frozen_service_is_finished_after_a_restart(receiver_for: Any,
                                                                                     config_for: MakeConfig) -> None:
    port = free_port()
    config = config_for({"svc": sleeper(HTTP_SERVER, str(port), probes=[
        {"name": "health", "type": "http", "url": f"http://127.0.0.1:{port}/", "timeout": "500ms"}])},
        confirm={"probe_failures": 2, "interval": "100ms", "window": "1s"})
    child = start_service(config, "svc")
    try:
        await wait_until(lambda: port_open(port), 10, what="service up")
        os.kill(child.pid, signal.SIGSTOP)
        # The receiver crashed in the middle of the repair: the audit row says running.
        store = Store(config.resolve(config.receiver.state_file))
        labels = '{"alertname": "CaretakerProbeFailing", "service_name": "svc", "probe": "health"}'
        (entry_id,) = store.admit([NewAlert("fz", "2026-01-01T00:00:00+00:00", "firing", "CaretakerProbeFailing",
                                            "svc", "restart", "queued", "", labels)], time.time())
        assert entry_id is not None
        store.update(entry_id, decision="acted", state="running", started_at=time.time())
        store.close()
        client = await receiver_for(config)
        entries = await wait_audit(client, lambda es: any(e["result"] == "success" for e in es))
        done, interrupted = entries
        assert interrupted["state"] == "interrupted"
        assert done["observation"]["holds"] is True and done["observation"]["processes"] == 1
        messages = [s["message"] for s in done["steps"]]
        assert any(m.startswith("SIGCONT") for m in messages) and not any("SIGKILL" in m for m in messages)
        (new,) = pids(config, "svc")
        assert new != child.pid
    finally:
        await kill_child(child)


def test_a_dependency_cycle_is_a_config_error_that_names_the_place(tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text(
        "services:\n"
        "  web:\n"
        "    match: {comm: web}\n"
        "    depends_on: [redis]\n"
        "  redis:\n"
        "    match: {comm: redis}\n"
        "    depends_on: [web, nothing]\n")
    result = subprocess.run([sys.executable, "-m", "receiver.app", "--check-config", "--config",
                             str(tmp_path / "bad.yml")], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "services.web.depends_on[0] (line 4): dependency cycle: web -> redis -> web" in result.stderr
    assert "services.redis.depends_on[1] (line 7): no service named 'nothing'" in result.stderr


async def test_problems_api_lists_open_problems_with_their_next_attempt(receiver_for: Any,
                                                                        config_for: MakeConfig) -> None:
    config = config_for({"svc": sleeper()}, cooldown="1h")
    client = await receiver_for(config)
    await post_alerts(client, alert("q1", service_name="svc", remediation="restart"))
    await wait_audit(client, lambda es: any(e["result"] == "success" for e in es))
    await stop_services(config)  # it dies again while its alert still fires: the cooldown holds it back
    resp = await client.get("/api/v1/problems", params={"state": "open"}, headers=AUTH)
    (problem,) = (await resp.json())["data"]
    assert (problem["fingerprint"], problem["state"], problem["attempts"]) == ("q1", "open", 1)
    assert problem["next_attempt_at"] > time.time() + 3000
    await post_alerts(client, alert("q1", status="resolved", service_name="svc", remediation="restart"))
    resp = await client.get("/api/v1/problems", params={"state": "open"}, headers=AUTH)
    assert (await resp.json())["data"] == []
    resp = await client.get("/api/v1/problems", headers=AUTH)
    assert [p["state"] for p in (await resp.json())["data"]] == ["closed"]
    assert (await client.get("/api/v1/problems", params={"state": "bogus"}, headers=AUTH)).status == 400


pytestmark = pytest.mark.timeout(90)


async def test_caretakerctl_pauses_and_resumes_and_once_shows_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from aiohttp.test_utils import TestServer

    from exporter.app import paused_services
    from exporter.config import load_config
    from receiver.app import create_app
    from receiver.ctl import main as ctl

    port = free_port()
    (tmp_path / "token").write_text(AUTH_TOKEN)
    (tmp_path / "caretaker.yml").write_text(
        f"receiver: {{port: {port}, bearer_token: {{file: token}}, state_file: state.sqlite}}\n"
        "services:\n  svc: {match: {comm: '^caretaker-none$'}, processes: {min: 0, max: 1}}\n")
    config = load_config(tmp_path / "caretaker.yml")
    server = TestServer(create_app(config), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        path = str(tmp_path / "caretaker.yml")
        await asyncio.to_thread(ctl, ["--config", path, "pause", "svc", "--for", "10m", "--reason", "upgrade"])
        assert "svc: paused until" in capsys.readouterr().out
        (until,) = paused_services(config, time.time()).values()  # what --once shows
        assert until is not None and 590 < until - time.time() <= 600
        with pytest.raises(SystemExit) as exit_info:
            await asyncio.to_thread(ctl, ["--config", path, "pause", "ghost"])
        assert exit_info.value.code == 1
        assert "HTTP 404: no service named 'ghost'" in capsys.readouterr().err
        await asyncio.to_thread(ctl, ["--config", path, "resume", "svc"])
        assert capsys.readouterr().out.strip() == "svc: resumed"
        assert paused_services(config, time.time()) == {}
        await asyncio.to_thread(ctl, ["--config", path, "problems"])
        assert capsys.readouterr().out.startswith("   ID SERVICE")
    finally:
        await server.close()


async def test_caretakerctl_history_shows_the_audit_trail_with_each_step(tmp_path: Path, config_for: MakeConfig,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from receiver.app import create_app
    from receiver.ctl import main as ctl

    port = free_port()
    config = config_for({"svc": sleeper()}, token=True, port=port)
    (tmp_path / "caretaker.yml").write_text(
        f"receiver: {{port: {port}, bearer_token: {{file: token}}, state_file: state.sqlite}}\n"
        "services:\n  svc: {match: {comm: '^caretaker-none$'}}\n")
    server = TestServer(create_app(config), host="127.0.0.1", port=port)
    await server.start_server()
    client = TestClient(server)
    try:
        await post_alerts(client, alert("h1570", service_name="svc", remediation="restart"))
        entries = await wait_audit(client, lambda es: any(e["result"] for e in es))
        (started,) = pids(config, "svc")
        path = str(tmp_path / "caretaker.yml")
        await asyncio.to_thread(ctl, ["--config", path, "history", "--service", "svc"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"#{entries[0]['id']} ")
        assert "svc  CaretakerServiceDown (firing)  restart: acted -> success in " in out[0]
        assert out[1].strip() == "observed: 0 processes, expected 1..1"
        steps = "\n".join(out[2:])
        assert "s  started " in steps and steps.index("s  started ") < steps.index(f" as pid {started}\n"), out
        assert out[-1].split("s  ", 1)[1].startswith("verified: 1 processes")
        await asyncio.to_thread(ctl, ["--config", path, "history", "--limit", "1", "--json"])
        assert [e["id"] for e in json.loads(capsys.readouterr().out)] == [entries[0]["id"]]
    finally:
        await client.close()
        await stop_services(config)


async def test_a_problem_no_notification_refreshes_expires(receiver_for: Any, config_for: MakeConfig) -> None:
    config = config_for({"svc": sleeper()}, problem_ttl="1s")
    client = await receiver_for(config)
    await client.post("/api/v1/services/svc/pause", headers=AUTH)  # so that nothing else happens to it
    await post_alerts(client, alert("old", service_name="svc", remediation="restart"))
    deadline = time.monotonic() + 10
    while True:
        resp = await client.get("/api/v1/problems", headers=AUTH)
        (problem,) = (await resp.json())["data"]
        if problem["state"] != "open":
            break
        assert time.monotonic() < deadline, problem
        await asyncio.sleep(0.1)
    assert problem["state"] == "expired" and problem["closed_at"] - problem["last_seen"] >= 1.0
    assert pids(config, "svc") == []


async def test_an_exec_label_that_does_not_match_is_a_skip_not_an_attempt(receiver_for: Any, tmp_path: Path,
                                                                          config_for: MakeConfig) -> None:
    marker = tmp_path / "ran"
    config = config_for({"svc": {
        "match": {"comm": "^caretaker-none$"}, "processes": {"min": 0, "max": 1},
        "remediation": {"allow": ["exec"], "exec": {
            "argv": [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(marker),
                     "{queue}"],
            "labels": {"queue": "[a-z]+"}}}}})
    client = await receiver_for(config)
    await post_alerts(client, alert("x1", alertname="QueueStuck", service_name="svc", remediation="exec",
                                    queue="jobs; rm -rf /"))
    (entry,) = await wait_audit(client, lambda es: es and es[0]["reason"])
    assert (entry["decision"], entry["reason"]) == ("skipped", "invalid_label")
    assert "does not match" in entry["observation"]["error"]
    executor = client.server.app[EXECUTOR_KEY]
    assert await executor.db(executor.store.repairs_since, "svc", 0) == 0  # nothing spent
    assert not marker.exists()
    await post_alerts(client, alert("x2", alertname="QueueStuck", service_name="svc", remediation="exec", queue="jobs"))
    await wait_audit(client, lambda es: any(e["result"] == "success" for e in es))
    assert marker.read_text() == "jobs"


READS_ITS_STATE = ("import json, sys, time\n"
                   "json.load(open(sys.argv[1]))  # a corrupt state file: it dies at start\n"
                   "while True: time.sleep(1)\n")


async def test_a_corrupt_state_file_is_restored_before_the_app_that_reads_it_is_restarted(
        receiver_for: Any, tmp_path: Path, config_for: MakeConfig) -> None:
    # Both problems at once, the restart's first: the file must be restored first, or the
    # restart fails (and a restore skipped for cooldown would leave it down).
    state = tmp_path / "state.json"
    state.write_text('{"jobs": 3}')
    (tmp_path / "default.json").write_text('{"jobs": 0}')
    service = sleeper(READS_ITS_STATE, str(state))
    service["files"] = [{"path": "state.json", "format": "json", "default": "default.json"}]
    service["remediation"]["allow"] = ["restart", "restore_file"]
    config = config_for({"svc": service}, cooldown="1h")
    state.write_text('{"jobs": 3, "half-writ')
    client = await receiver_for(config)
    await post_alerts(client, alert("down", service_name="svc", remediation="restart"),
                      alert("bad", alertname="CaretakerFileCorrupt", service_name="svc", path="state.json",
                            remediation="restore_file"))
    entries = await wait_audit(client, lambda es: sum(e["result"] == "success" for e in es) == 2)
    acted = sorted((e for e in firing(entries) if e["decision"] == "acted"), key=lambda e: e["started_at"])
    assert [(e["action"], e["result"]) for e in acted] == [("restore_file", "success"), ("restart", "success")]
    assert json.loads(state.read_text()) == {"jobs": 0}
    assert len(pids(config, "svc")) == 1


async def test_a_repair_that_hangs_times_out_and_does_not_block_the_service(receiver_for: Any, tmp_path: Path,
                                                                            config_for: MakeConfig) -> None:
    started = tmp_path / "hung.pid"
    service = sleeper()
    service["remediation"] = {
        "allow": ["exec", "restart"], "timeout": "1s", "verify_timeout": 5,
        "exec": {"argv": [sys.executable, "-c",
                          "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)",
                          str(started)], "timeout": "60s"}}
    config = config_for({"svc": service})
    client = await receiver_for(config)
    executor = client.server.app[EXECUTOR_KEY]
    executor.ctx.reaper.add(start_service(config, "svc"))  # healthy: the exec alert is acted on once
    await wait_until(lambda: len(pids(config, "svc")) == 1, 10, what="service up")
    await post_alerts(client, alert("hang", alertname="QueueStuck", service_name="svc", remediation="exec"))
    (entry,) = await wait_audit(client, lambda es: es and es[0]["result"])
    assert (entry["decision"], entry["result"]) == ("acted", "failure")
    assert entry["steps"][-1]["message"].startswith("failed: timed out after 1s")
    assert entry["finished_at"] - entry["started_at"] < 3
    hung = int(started.read_text())
    await wait_until(lambda: process_state(hung) in ("Z", "X"), 5, what="the hung command to be killed")
    # The service is not blocked behind it: another problem is repaired at once.
    await stop_services(config)
    await post_alerts(client, alert("down", service_name="svc", remediation="restart"))
    entries = await wait_audit(client, lambda es: any(e["result"] == "success" for e in es))
    assert [e["fingerprint"] for e in entries if e["result"] == "success"] == ["down"]


async def test_a_flooded_service_does_not_hold_back_another(receiver_for: Any, config_for: MakeConfig,
                                                           tmp_path: Path) -> None:
    """999 alerts for one service, whose repair takes long, and an alert for another:
    the other is answered 200 and repaired while the slow repair still runs."""
    holding = tmp_path / "slow-holds"
    holding.touch()  # the slow repair runs until the test removes it
    slow = sleeper()
    slow["remediation"] = {"allow": ["exec"], "exec": {"argv": [
        sys.executable, "-c", "import os, sys, time\nwhile os.path.exists(sys.argv[1]): time.sleep(0.05)",
        str(holding)], "timeout": "60s"}}
    config = config_for({"slow": slow, "other": sleeper()})
    client = await receiver_for(config)
    flood = [alert(f"fl{i}", alertname="QueueStuck", service_name="slow", remediation="exec", queue=str(i))
             for i in range(999)]
    resp = await client.post("/alerts", json=notification(*flood), headers=AUTH)
    assert resp.status == 200 and (await resp.json())["queued"] == 999

    async def slow_running() -> bool:
        resp = await client.get("/api/v1/remediations", params={"service_name": "slow", "limit": "1000"},
                                headers=AUTH)
        return [e["state"] for e in (await resp.json())["data"] if e["decision"] == "acted"] == ["running"]

    deadline = time.monotonic() + 10
    while not await slow_running():
        assert time.monotonic() < deadline, "the slow repair did not start"
        await asyncio.sleep(0.05)
    started = time.monotonic()
    resp = await client.post("/alerts", json=notification(alert("o1", service_name="other", remediation="restart")),
                             headers=AUTH)
    assert resp.status == 200
    deadline = started + 10
    while not pids(config, "other"):
        assert time.monotonic() < deadline, "the other service was not repaired"
        await asyncio.sleep(0.05)
    assert await slow_running()  # the other was repaired while the slow repair still ran
    holding.unlink()


async def test_a_late_resolved_notification_of_an_earlier_incident_does_not_close_the_current(
        receiver_for: Any, config_for: MakeConfig) -> None:
    config = config_for({"svc": sleeper()})
    client = await receiver_for(config)
    await client.post("/api/v1/services/svc/pause", headers=AUTH)  # nothing else happens to it
    await post_alerts(client, alert("same", service_name="svc", remediation="restart",
                                    starts_at="2026-11-22T03:00:00Z"))
    await post_alerts(client, alert("same", status="resolved", service_name="svc", remediation="restart",
                                    starts_at="2026-11-21T03:00:00Z"))  # yesterday's incident, retried late
    resp = await client.get("/api/v1/problems", headers=AUTH)
    (problem,) = (await resp.json())["data"]
    assert problem["state"] == "open"
    await post_alerts(client, alert("same", status="resolved", service_name="svc", remediation="restart",
                                    starts_at="2026-11-22T03:00:00Z"))
    resp = await client.get("/api/v1/problems", headers=AUTH)
    assert [p["state"] for p in (await resp.json())["data"]] == ["closed"]


async def test_one_problem_in_cooldown_does_not_hold_back_another(receiver_for: Any, tmp_path: Path,
                                                                  config_for: MakeConfig) -> None:
    marker = tmp_path / "exec-ran"
    service = sleeper()
    service["remediation"] = {"allow": ["restart", "exec"], "verify_timeout": 5,
                              "exec": {"argv": [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')",
                                                str(marker)]}}
    config = config_for({"svc": service}, cooldown="1h", attempts={"max": 10, "window": "1h"})
    client = await receiver_for(config)
    await post_alerts(client, alert("r1", service_name="svc", remediation="restart"))
    await wait_audit(client, lambda es: any(e["result"] == "success" for e in es))
    await stop_services(config)  # down again: its restart waits out the 1 h cooldown
    await post_alerts(client, alert("r1", service_name="svc", remediation="restart"),  # a resend
                      alert("e1", alertname="QueueStuck", service_name="svc", remediation="exec"))
    entries = await wait_audit(client, lambda es: any(e["fingerprint"] == "e1" and e["result"] for e in es))
    assert marker.exists()
    assert [e["reason"] for e in entries if e["fingerprint"] == "r1" and e["decision"] == "skipped"] == ["cooldown"]


async def test_a_service_that_recovers_while_its_repair_waits_for_a_slot_is_not_restarted(
        receiver_for: Any, config_for: MakeConfig, tmp_path: Path) -> None:
    holding = tmp_path / "stubborn-holds"
    holding.touch()
    config = config_for({"stubborn": sleeper(HOLDS_ON_TERM, str(holding), grace=60), "svc": sleeper()}, workers=1)
    client = await receiver_for(config)
    executor = client.server.app[EXECUTOR_KEY]
    executor.ctx.reaper.add(start_service(config, "stubborn"))
    (pid,) = await wait_until(lambda: pids(config, "stubborn"), 10, what="stubborn up")
    await wait_until(lambda: signal_caught(pid, signal.SIGTERM), 5, what="stubborn to handle SIGTERM")
    # The only slot goes to a restart whose stop lasts until the test lets stubborn go.
    await post_alerts(client, alert("s1", alertname="CaretakerMemoryAboveLimit", service_name="stubborn",
                                    remediation="restart"))
    await wait_until(lambda: stepped(client, "stubborn", "SIGTERM"), 10, what="the restart of stubborn to stop it")
    await post_alerts(client, alert("v1", service_name="svc", remediation="restart"))  # svc is down, and waits
    registry = client.server.app[REGISTRY_KEY]  # its worker has read its problems: next, it waits for the slot
    await wait_until(lambda: registry.get_sample_value("caretaker_problems_open", {"service_name": "svc"}) == 1, 10,
                     what="the worker of svc to wait for the slot")
    child = start_service(config, "svc")  # someone starts it by hand meanwhile
    executor.ctx.reaper.add(child)
    await wait_until(lambda: pids(config, "svc") == [child.pid], 10, what="svc up")
    resp = await client.get("/api/v1/remediations", headers=AUTH)
    assert not [e for e in (await resp.json())["data"] if e["fingerprint"] == "v1" and e["reason"]]  # not decided
    holding.unlink()  # stubborn stops; its restart ends and frees the slot
    entries = await wait_audit(client, lambda es: any(e["fingerprint"] == "v1" and e["reason"] for e in es), 30)
    (decision,) = [e for e in entries if e["fingerprint"] == "v1"]
    assert (decision["decision"], decision["reason"]) == ("skipped", "condition_cleared")
    assert pids(config, "svc") == [child.pid]


STALLS_WHILE_FLAGGED = ("import http.server, os, sys, time\n"
                        "class H(http.server.BaseHTTPRequestHandler):\n"
                        "    def do_GET(self):\n"
                        "        if os.path.exists(sys.argv[2]):  # a stall (a GC, an fsync): a request that comes\n"
                        "            with open(sys.argv[3], 'a') as seen:  # during it is noted, and fails\n"
                        "                seen.write('probe\\n')\n"
                        "            while os.path.exists(sys.argv[2]): time.sleep(0.05)\n"
                        "            self.send_response(503); self.end_headers(); return\n"
                        "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
                        "    def log_message(self, *a): pass\n"
                        "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")


async def test_a_service_that_stalls_for_a_few_seconds_is_not_restarted(receiver_for: Any, tmp_path: Path,
                                                                        config_for: MakeConfig) -> None:
    port, flag, seen = free_port(), tmp_path / "stalled", tmp_path / "probed-while-stalled"
    config = config_for({"svc": sleeper(STALLS_WHILE_FLAGGED, str(port), str(flag), str(seen), probes=[
        {"name": "health", "type": "http", "url": f"http://127.0.0.1:{port}/", "timeout": "500ms"}])})
    child = start_service(config, "svc")
    try:
        await wait_until(lambda: port_open(port), 10, what="service up")
        client = await receiver_for(config)
        flag.touch()  # a stall: the exporter's probe fails, and the alert fires at once
        started = time.monotonic()
        await post_alerts(client, alert("st", alertname="CaretakerProbeFailing", service_name="svc", probe="health",
                                        remediation="restart"))
        # The receiver probes three times over its 5 s confirmation window: the stall lasts
        # over the first two (2.5 s apart), and is over by the third.
        await wait_until(lambda: seen.exists() and len(seen.read_text().split()) >= 2, 20,
                         what="the receiver's second probe during the stall")
        flag.unlink()
        (entry,) = await wait_audit(client, lambda es: es and es[0]["reason"], 20)
        assert (entry["decision"], entry["reason"]) == ("skipped", "condition_cleared")
        assert time.monotonic() - started >= 4  # it looked over the whole window
        assert pids(config, "svc") == [child.pid]
    finally:
        flag.unlink(missing_ok=True)
        await kill_child(child)


async def test_a_pause_during_a_repair_keeps_it_from_starting_the_service(receiver_for: Any, tmp_path: Path,
                                                                          config_for: MakeConfig) -> None:
    holding = tmp_path / "svc-holds"
    holding.touch()
    config = config_for({"svc": sleeper(HOLDS_ON_TERM, str(holding), grace=60)})
    client = await receiver_for(config)
    client.server.app[EXECUTOR_KEY].ctx.reaper.add(start_service(config, "svc"))
    (pid,) = await wait_until(lambda: pids(config, "svc"), 10, what="service up")
    await wait_until(lambda: signal_caught(pid, signal.SIGTERM), 5, what="the service to handle SIGTERM")
    await post_alerts(client, alert("mem", alertname="CaretakerMemoryAboveLimit", service_name="svc",
                                    remediation="restart"))
    # The repair sent SIGTERM and waits for the service to go; the operator pauses meanwhile.
    await wait_until(lambda: stepped(client, "svc", "SIGTERM"), 10, what="the restart to stop the service")
    assert (await client.post("/api/v1/services/svc/pause", headers=AUTH)).status == 200
    holding.unlink()  # only now does the service exit
    entries = await wait_audit(client, lambda es: any(e["result"] for e in es), 20)
    (acted,) = [e for e in entries if e["decision"] == "acted"]
    assert acted["result"] == "failure" and "paused by an operator" in acted["steps"][-1]["message"]
    assert pids(config, "svc") == []
