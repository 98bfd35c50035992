"""Heartbeats, log patterns (with real logrotate), files, filesystems, ports, --once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter.app import SCRAPER_KEY, create_app
from exporter.client import Feeder, send
from exporter.config import parse_config
from exporter.heartbeats import HeartbeatStore
from exporter.logtail import LogFollower, patterns_for

from .conftest import REPO, Children, free_port, port_open, require_binary, wait_for
from .test_exporter import samples, value

Client = TestClient[web.Request, web.Application]


def config_with(service: dict[str, Any], tmp_path: Path, **exporter: Any) -> Any:
    return parse_config({"exporter": {"state_file": "state.json", **exporter},
                         "services": {"svc": {"match": {"comm": "^nothing-matches$"}, **service}}}, base_dir=tmp_path)


async def scrape(client: Client) -> Any:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return samples(await resp.text())


# --- heartbeats ---------------------------------------------------------------------------

async def test_heartbeat_endpoint_metrics_and_unknown_names(exporter_for: Any, tmp_path: Path) -> None:
    client = await exporter_for(config_with({"heartbeats": [{"name": "worker", "timeout": "30s"}]}, tmp_path))
    data = await scrape(client)
    labels = {"service_name": "svc", "heartbeat": "worker"}
    assert value(data, "caretaker_heartbeat_last_timestamp_seconds", **labels) == 0
    assert value(data, "caretaker_heartbeat_timeout_seconds", **labels) == 30
    assert value(data, "caretaker_service_health_component_ratio", service_name="svc", component="heartbeats") == 0
    before = time.time()
    resp = await client.post(f"/heartbeat/worker?pid={os.getpid()}")
    assert resp.status == 200
    assert (await client.post("/heartbeat/typo")).status == 404
    assert (await client.post("/heartbeat/worker?pid=abc")).status == 400
    assert (await client.post("/heartbeat/worker?pid=-1")).status == 400
    data = await scrape(client)
    assert value(data, "caretaker_heartbeat_last_timestamp_seconds", **labels) >= before
    assert value(data, "caretaker_heartbeat_pid", **labels) == os.getpid()
    assert value(data, "caretaker_heartbeat_process_alive", **labels) == 1
    assert value(data, "caretaker_service_health_component_ratio", service_name="svc", component="heartbeats") == 1
    assert not any(k[0].startswith("caretaker_heartbeat") and ("heartbeat", "typo") in k[1] for k in data)
    assert (await client.post("/heartbeat/worker/fail")).status == 200
    data = await scrape(client)
    assert value(data, "caretaker_heartbeat_last_failure_timestamp_seconds", **labels) >= before
    assert value(data, "caretaker_service_health_component_ratio", service_name="svc", component="heartbeats") == 0


async def test_heartbeats_survive_an_exporter_restart(exporter_for: Any, tmp_path: Path) -> None:
    config = config_with({"heartbeats": [{"name": "worker", "timeout": "1m"}]}, tmp_path)
    first = await exporter_for(config)
    assert (await first.post("/heartbeat/worker")).status == 200
    fed = value(await scrape(first), "caretaker_heartbeat_last_timestamp_seconds", service_name="svc",
                heartbeat="worker")
    await first.close()
    assert json.loads((tmp_path / "state.json").read_text())["heartbeats"]["worker"]["last_seen"] == fed
    second = await exporter_for(config)
    assert value(await scrape(second), "caretaker_heartbeat_last_timestamp_seconds", service_name="svc",
                 heartbeat="worker") == fed


def test_corrupt_heartbeat_state_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    store = HeartbeatStore(path, ["worker"])
    store.load()
    assert store.states["worker"].last_seen == 0
    assert (tmp_path / "state.json.corrupt").read_text() == "{not json"


def test_reporting_process_that_dies_is_not_alive(tmp_path: Path, children: Children, python: str) -> None:
    store = HeartbeatStore(tmp_path / "s.json", ["w"])
    proc = children.start([python, "-c", "import time; time.sleep(60)"])
    store.beat("w", proc.pid)
    assert store.process_alive("w") and store.healthy("w", 60)
    proc.kill()
    proc.wait()
    assert not store.process_alive("w") and not store.healthy("w", 60)


async def test_client_feeds_a_heartbeat_without_blocking_or_raising(tmp_path: Path) -> None:
    config = config_with({"heartbeats": [{"name": "app", "timeout": "30s"}]}, tmp_path, port=free_port())
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config.exporter.port).start()
    url = f"http://127.0.0.1:{config.exporter.port}"
    try:
        store = runner.app[SCRAPER_KEY].heartbeats
        feeder = await asyncio_to_thread(lambda: Feeder("app", url, interval=0.2).start())
        await wait_async(lambda: store.states["app"].received >= 2, 10)
        await asyncio_to_thread(feeder.stop)
        assert store.states["app"].pid == os.getpid()
    finally:
        await runner.cleanup()
    # the exporter is gone: the client says False, never raises, and returns quickly
    started = time.monotonic()
    assert send("app", url, timeout=1) is False
    assert send("app", "file:///etc/passwd") is False
    assert time.monotonic() - started < 3


async def asyncio_to_thread(func: Callable[[], Any]) -> Any:
    import asyncio
    return await asyncio.to_thread(func)


async def wait_async(predicate: Callable[[], bool], timeout: float) -> None:
    import asyncio
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


# --- log patterns ---------------------------------------------------------------------

def follower(path: Path, **kw: Any) -> LogFollower:
    config = config_with({"logs": [{"path": str(path), "patterns": [{"name": "boom", "regex": "BOOM"}]}]},
                         path.parent)
    return LogFollower(path, patterns_for(config.services["svc"].logs[0]), **kw)


def append(path: Path, *lines: str) -> None:
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


def test_starts_at_the_end_and_counts_new_lines_once(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "BOOM old", "Traceback (most recent call last):")
    f = follower(log)
    assert f.poll() == {}
    append(log, "BOOM 1", "fine", "Traceback (most recent call last):", "OSError: [Errno 28] No space left on device")
    assert f.poll() == {"boom": 1, "python_traceback": 1, "disk_full": 1}
    assert f.poll() == {}


def test_partial_lines_wait_for_their_newline(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    f = follower(log)
    f.poll()
    with open(log, "a") as out:
        out.write("BO")
    assert f.poll() == {}
    with open(log, "a") as out:
        out.write("OM\n")
    assert f.poll() == {"boom": 1}


def test_missing_file_then_created_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    f = follower(log)
    assert f.poll() == {}
    append(log, "BOOM a", "BOOM b")
    assert f.poll() == {"boom": 2}
    log.unlink()
    assert f.poll() == {}


def test_work_per_poll_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    log.write_text("")
    f = follower(log, read_limit=4096)
    f.poll()
    append(log, *(["BOOM " + "x" * 90] * 200))  # ~19 KiB
    first = f.poll()["boom"]
    assert first < 200
    total = first
    for _ in range(10):
        total += f.poll().get("boom", 0)
    assert total == 200


@pytest.mark.parametrize("method", ["create", "copytruncate"])
def test_real_logrotate_loses_and_doubles_nothing(tmp_path: Path, method: str) -> None:
    logrotate = require_binary("logrotate")
    log = tmp_path / "app.log"
    append(log, "before start BOOM")
    f = follower(log, rotate_wait=0.0 if method == "create" else 30.0)
    f.poll()
    append(log, *[f"line {i} BOOM" for i in range(10)])
    assert f.poll() == {"boom": 10}
    append(log, *[f"unread {i} BOOM" for i in range(7)])  # written, not yet read, then rotated
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n  {method}\n  rotate 3\n  missingok\n}}\n")
    result = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "app.log.1").exists()
    append(log, *[f"after {i} BOOM" for i in range(5)])
    assert f.poll() == {"boom": 12}
    assert f.poll() == {}
    f.close()


async def test_log_matches_are_exposed_per_pattern_and_severity(exporter_for: Any, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    client = await exporter_for(config_with({"logs": [{"path": "access.log"}]}, tmp_path))
    data = await scrape(client)
    labels = {"service_name": "svc", "pattern": "http_5xx", "severity": "error"}
    assert value(data, "caretaker_log_pattern_matches_total", **labels) == 0
    append(log, '127.0.0.1 - - [22/Nov/2026:03:00:00 +0000] "GET / HTTP/1.1" 502 12',
           '127.0.0.1 - - [22/Nov/2026:03:00:01 +0000] "GET / HTTP/1.1" 200 12',
           'INFO:     127.0.0.1:5000 - "GET /x HTTP/1.1" 500 Internal Server Error')
    data = await scrape(client)
    assert value(data, "caretaker_log_pattern_matches_total", **labels) == 2
    assert value(data, "caretaker_log_pattern_matches_total", service_name="svc", pattern="out_of_memory",
                 severity="critical") == 0


# --- files, directories, filesystems --------------------------------------------------------

async def test_file_checks(exporter_for: Any, tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"ok": true}')
    (tmp_path / "broken.json").write_text('{"ok": tru')
    (tmp_path / "old.yml").write_text("a: 1\n")
    os.utime(tmp_path / "old.yml", (time.time() - 7200, time.time() - 7200))
    (tmp_path / "wrong-mode.txt").write_text("x")
    os.chmod(tmp_path / "wrong-mode.txt", 0o644)
    (tmp_path / "data").mkdir(mode=0o700)
    os.chmod(tmp_path / "data", 0o700)
    os.chmod(tmp_path / "state.json", 0o600)
    client = await exporter_for(config_with({
        "files": [{"path": "state.json", "format": "json", "mode": "0600"},
                  {"path": "broken.json", "format": "json"},
                  {"path": "old.yml", "format": "yaml", "max_age": "1h"},
                  {"path": "absent.json", "format": "json"},
                  {"path": "wrong-mode.txt", "mode": "0600"}],
        "directories": [{"path": "data", "mode": "0700"}, {"path": "missing-dir"}],
        "data_paths": ["data"]}, tmp_path))
    data = await scrape(client)
    f = {"service_name": "svc"}
    assert value(data, "caretaker_file_valid", path="state.json", **f) == 1
    assert value(data, "caretaker_file_attributes_match", path="state.json", **f) == 1
    assert value(data, "caretaker_file_size_bytes", path="state.json", **f) == 12
    assert value(data, "caretaker_file_valid", path="broken.json", **f) == 0
    assert value(data, "caretaker_file_exists", path="broken.json", **f) == 1
    assert value(data, "caretaker_file_exists", path="absent.json", **f) == 0
    assert value(data, "caretaker_file_max_age_seconds", path="old.yml", **f) == 3600
    assert time.time() - value(data, "caretaker_file_mtime_timestamp_seconds", path="old.yml", **f) > 7000
    assert value(data, "caretaker_directory_exists", path="data", **f) == 1
    assert value(data, "caretaker_directory_attributes_match", path="data", **f) == 1
    assert value(data, "caretaker_directory_exists", path="missing-dir", **f) == 0
    st = os.statvfs(tmp_path / "data")
    assert value(data, "caretaker_filesystem_size_bytes", path="data", **f) == st.f_blocks * st.f_frsize
    assert value(data, "caretaker_filesystem_avail_bytes", path="data", **f) > 0
    assert value(data, "caretaker_file_attributes_match", path="wrong-mode.txt", **f) == 0
    # integrity: 5 files and 2 directories; state.json and data are as they should be
    assert value(data, "caretaker_service_health_component_ratio", component="integrity", **f) == 2 / 7


# --- ports --------------------------------------------------------------------------------------

async def test_port_held_by_another_process_is_a_conflict(exporter_for: Any, tmp_path: Path, children: Children,
                                                          python: str) -> None:
    port = free_port()
    squatter = ("import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(60)\n")
    proc = children.start([python, "-c", squatter, "squatter"])
    wait_for(lambda: port_open(port), 10, what="squatter listening")
    config = parse_config({"services": {
        "svc": {"match": {"cmdline": "^nothing-matches$"}, "ports": [port]},
        "owner": {"match": {"cmdline": "squatter$"}, "ports": [port]}}}, base_dir=tmp_path)
    data = await scrape(await exporter_for(config))
    assert value(data, "caretaker_service_port_listening", service_name="svc", port=str(port)) == 1
    assert value(data, "caretaker_service_port_conflict", service_name="svc", port=str(port)) == 1
    holder = [k for k in data if k[0] == "caretaker_service_port_holder_info" and ("service_name", "svc") in k[1]]
    assert len(holder) == 1
    info = dict(holder[0][1])
    assert info["pid"] == str(proc.pid)
    assert info["comm"].startswith("python")
    assert value(data, "caretaker_service_port_conflict", service_name="owner", port=str(port)) == 0


# --- the whole scrape, and --once -----------------------------------------------------------------

async def test_promtool_clean_on_a_scrape_with_every_kind_of_series(exporter_for: Any, tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    (tmp_path / "s.json").write_text("{}")
    (tmp_path / "app.log").write_text("")
    config = config_with({
        "probes": [{"name": "tcp", "type": "tcp", "port": free_port()},
                   {"name": "web", "type": "http", "url": f"https://127.0.0.1:{free_port()}/"},
                   {"name": "cmd", "type": "exec", "argv": ["true"]}],
        "heartbeats": [{"name": "hb", "timeout": "10s"}], "logs": [{"path": "app.log"}],
        "files": [{"path": "s.json", "format": "json"}], "directories": [{"path": "."}], "data_paths": ["."],
        "ports": [free_port()], "limits": {"memory_bytes": 10**9, "open_fds": 100}}, tmp_path)
    client = await exporter_for(config)
    await client.post("/heartbeat/hb")
    text = await (await client.get("/metrics")).text()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not (result.stdout + result.stderr), result.stdout + result.stderr
    names = {k[0] for k in samples(text)}
    for expected in ("caretaker_probe_failure_reason", "caretaker_probe_tls_cert_expiry_timestamp_seconds",
                     "caretaker_heartbeat_process_alive", "caretaker_log_pattern_matches_total",
                     "caretaker_file_valid", "caretaker_filesystem_avail_bytes", "caretaker_service_port_conflict",
                     "caretaker_service_memory_limit_bytes"):
        assert expected in names, expected


def test_once_prints_status_and_exit_code(tmp_path: Path, children: Children, python: str) -> None:
    marker = f"once-{os.getpid()}"
    (tmp_path / "app.log").write_text("Traceback (most recent call last):\nKeyError: 1\n")
    config = {"exporter": {"state_file": "st.json"}, "services": {
        "up": {"match": {"cmdline": f"{marker}$"}},
        "down": {"match": {"cmdline": "never-running-xyz$"}, "logs": [{"path": "app.log"}],
                 "probes": [{"name": "port", "type": "tcp", "port": free_port()}]}}}
    path = tmp_path / "caretaker.yml"
    path.write_text(json.dumps(config))
    proc = children.start([python, "-c", "import time; time.sleep(60)", marker])
    wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().endswith(marker.encode() + b"\0"), 5)
    table = subprocess.run([sys.executable, "-m", "exporter.app", "--config", str(path), "--once"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert table.returncode == 1, table.stderr
    lines = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert lines["up"].split()[1:3] == ["1/1", "1.00"]
    assert "port (refused)" in lines["down"] and "python_traceback 1" in lines["down"]
    as_json = subprocess.run([sys.executable, "-m", "exporter.app", "--config", str(path), "--once", "--json"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    rows = {r["service"]: r for r in json.loads(as_json.stdout)["services"]}
    assert rows["down"]["failing_probes"] == {"port": "refused"} and rows["up"]["health"] == 1.0
    config["services"].pop("down")
    path.write_text(json.dumps(config))
    healthy = subprocess.run([sys.executable, "-m", "exporter.app", "--config", str(path), "--once"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert healthy.returncode == 0, healthy.stdout


def test_threads_are_not_leaked_by_the_feeder(tmp_path: Path) -> None:
    feeder = Feeder("x", f"http://127.0.0.1:{free_port()}", interval=0.05).start()
    time.sleep(0.2)
    feeder.stop()
    assert not any(t.name == "caretaker-heartbeat-x" for t in threading.enumerate())
