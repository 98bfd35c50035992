"""Heartbeats: the endpoint and its series, kept across restarts, the reporting
process's liveness, and the client apps use to feed them: ``beat()`` from the work
loop, a sender that reports only what the loop proved (caretaker_client), and the
deprecated ``feed()`` shim."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from caretaker_client import Heartbeat
from caretaker_client.heartbeat import URL_VARIABLE, send
from exporter.client import Feeder
from exporter.config import Config
from exporter.heartbeats import HeartbeatStore, read_saved

from .helpers import (
    REPO,
    Children,
    MakeConfig,
    free_port,
    idle_service,
    scrape_samples,
    serving_exporter,
    value,
    wait_until,
)


async def test_heartbeat_endpoint_metrics_and_unknown_names(exporter_for: Any, make_config: MakeConfig) -> None:
    client = await exporter_for(make_config(service=idle_service(heartbeats=[{"name": "worker", "timeout": "30s"}])))
    data = await scrape_samples(client)
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
    data = await scrape_samples(client)
    assert value(data, "caretaker_heartbeat_last_timestamp_seconds", **labels) >= before
    assert value(data, "caretaker_heartbeat_pid", **labels) == os.getpid()
    assert value(data, "caretaker_heartbeat_process_alive", **labels) == 1
    assert value(data, "caretaker_service_health_component_ratio", service_name="svc", component="heartbeats") == 1
    assert not any(k[0].startswith("caretaker_heartbeat") and ("heartbeat", "typo") in k[1] for k in data)
    assert (await client.post("/heartbeat/worker/fail")).status == 200
    data = await scrape_samples(client)
    assert value(data, "caretaker_heartbeat_last_failure_timestamp_seconds", **labels) >= before
    assert value(data, "caretaker_service_health_component_ratio", service_name="svc", component="heartbeats") == 0


async def test_heartbeats_survive_an_exporter_restart(exporter_for: Any, make_config: MakeConfig,
                                                      tmp_path: Path) -> None:
    config = make_config(service=idle_service(heartbeats=[{"name": "worker", "timeout": "1m"}]))
    first = await exporter_for(config)
    assert (await first.post("/heartbeat/worker")).status == 200
    fed = value(await scrape_samples(first), "caretaker_heartbeat_last_timestamp_seconds", service_name="svc",
                heartbeat="worker")
    await first.close()
    assert json.loads((tmp_path / "state.json").read_text())["heartbeats"]["worker"]["last_seen"] == fed
    second = await exporter_for(config)
    assert value(await scrape_samples(second), "caretaker_heartbeat_last_timestamp_seconds", service_name="svc",
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


def app_config(make_config: MakeConfig) -> Config:
    """Heartbeat ``app`` of a service ``svc``, the exporter on a free port."""
    return make_config(service=idle_service(heartbeats=[{"name": "app", "timeout": "30s"}]),
                       exporter={"port": free_port()})


async def test_client_feeds_a_heartbeat_without_blocking_or_raising(make_config: MakeConfig) -> None:
    async with serving_exporter(app_config(make_config)) as (url, store):
        with pytest.warns(DeprecationWarning, match="cannot prove"):
            feeder = Feeder("app", url, interval=0.2)
        await asyncio.to_thread(feeder.start)
        await wait_until(lambda: store.states["app"].received >= 2, 10)
        await asyncio.to_thread(feeder.stop)
        assert store.states["app"].pid == os.getpid()
    # the exporter is gone: the client says False, never raises, and returns quickly
    started = time.monotonic()
    assert await asyncio.to_thread(send, "app", url, timeout=1) is False
    assert await asyncio.to_thread(send, "app", "file:///etc/passwd") is False
    assert time.monotonic() - started < 3


def test_threads_are_not_leaked_by_the_feeder(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="cannot prove"):
        feeder = Feeder("x", f"http://127.0.0.1:{free_port()}", interval=0.05).start()
    time.sleep(0.2)
    feeder.stop()
    assert not any(t.name == "caretaker-heartbeat-x" for t in threading.enumerate())


# --- caretaker_client: beat() from the work loop, a sender that reports only what it proved ---------------

async def test_beats_are_reported_with_their_count_and_counted_by_the_exporter(make_config: MakeConfig) -> None:
    async with serving_exporter(app_config(make_config)) as (url, store):
        heartbeat = Heartbeat("app", url)
        assert await asyncio.to_thread(heartbeat.report) is None  # no beat: nothing is sent
        assert store.states["app"].received == 0
        for _ in range(3):
            heartbeat.beat()
        assert heartbeat.pending() == 3
        assert await asyncio.to_thread(heartbeat.report) is True
        assert (store.states["app"].received, store.states["app"].beats) == (1, 3)
        assert store.states["app"].pid == os.getpid()
        assert await asyncio.to_thread(heartbeat.report) is None  # nothing new since: nothing is sent
        assert store.states["app"].received == 1
        assert heartbeat.reports == 1


async def test_the_sender_reports_only_after_beats_and_once_per_interval(make_config: MakeConfig) -> None:
    async with serving_exporter(app_config(make_config)) as (url, store):
        heartbeat = Heartbeat("app", url, interval=0.3).start()
        try:
            await asyncio.sleep(0.6)  # the sender looks every 0.1s for a first beat: none came
            assert store.states["app"].received == 0
            heartbeat.beat()
            await wait_until(lambda: store.states["app"].received == 1, 10)  # the first beat is reported at once
            assert store.states["app"].beats == 1
            begun, made = time.monotonic(), 0
            while time.monotonic() - begun < 1.5:  # the loop beats every 10 ms
                heartbeat.beat()
                made += 1
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - begun
            await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(heartbeat.stop)
        reports = store.states["app"].received - 1
        assert 2 <= reports <= elapsed / 0.3 + 2, reports  # one per interval, not one per beat
        assert 0 < store.states["app"].beats - 1 <= made
        assert not any(t.name == "caretaker-heartbeat-app" for t in threading.enumerate())


async def test_the_asyncio_sender_reports_only_after_beats(make_config: MakeConfig) -> None:
    async with serving_exporter(app_config(make_config)) as (url, store):
        heartbeat = Heartbeat("app", url, interval=0.2)
        task = asyncio.create_task(heartbeat.run_async())
        try:
            await asyncio.sleep(0.5)
            assert store.states["app"].received == 0
            heartbeat.beat()
            heartbeat.beat()
            await wait_until(lambda: store.states["app"].received == 1, 10)
            assert store.states["app"].beats == 2
            await asyncio.sleep(0.5)  # the loop stopped beating: no more reports, while the task runs
            assert store.states["app"].received == 1 and not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_an_exporter_that_is_down_costs_the_app_nothing(tmp_path: Path) -> None:
    heartbeat = Heartbeat("app", f"http://127.0.0.1:{free_port()}", timeout=1)
    heartbeat.beat()
    assert heartbeat.report() is False  # refused: said, not raised
    assert heartbeat.pending() == 0  # its beats are dropped: a later report must not vouch for them
    assert heartbeat.report() is None
    assert Heartbeat("app", "file:///etc/passwd").report() is None  # no beat, nothing sent
    wrong = Heartbeat("app", "file:///etc/passwd")
    wrong.beat()
    assert wrong.report() is False and wrong.reports == 0


def test_beat_never_waits_for_a_sender_stuck_on_a_hung_exporter() -> None:
    with socket.socket() as hung:  # accepts connections, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        heartbeat = Heartbeat("app", f"http://127.0.0.1:{hung.getsockname()[1]}", interval=0.05, timeout=30).start()
        heartbeat.beat()
        conn, _ = hung.accept()  # the sender is inside its report now, waiting for an answer
        with conn:
            for _ in range(10_000):
                heartbeat.beat()
            assert heartbeat.pending() == 10_000  # every beat was taken while the sender waits
            thread = next(t for t in threading.enumerate() if t.name == "caretaker-heartbeat-app")
            assert thread.is_alive()
            heartbeat.stop(timeout=0)  # asks it to stop after this report, without waiting
        heartbeat.stop()  # the connection is closed: the report fails and the thread ends
    assert not thread.is_alive()
    assert heartbeat.reports == 0


def test_the_exporter_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URL_VARIABLE, raising=False)
    assert Heartbeat("app").url == "http://127.0.0.1:8930"
    monkeypatch.setenv(URL_VARIABLE, "http://127.0.0.1:19999")
    assert Heartbeat("app").url == "http://127.0.0.1:19999"
    assert Heartbeat("app", "http://10.0.0.1:8930").url == "http://10.0.0.1:8930"


async def test_an_app_with_only_caretaker_client_on_its_path_reports(make_config: MakeConfig, tmp_path: Path,
                                                                     python: str) -> None:
    only = tmp_path / "only"
    shutil.copytree(REPO / "caretaker_client", only / "caretaker_client")
    script = ("import importlib.util, os\n"
              "for name in ('exporter', 'receiver', 'aiohttp', 'prometheus_client'):\n"
              "    assert importlib.util.find_spec(name) is None, name + ' is importable'\n"
              "from caretaker_client import Heartbeat\n"
              "heartbeat = Heartbeat('app')\n"
              "for _ in range(5):\n"
              "    heartbeat.beat()\n"
              "assert heartbeat.report() is True, heartbeat.url\n"
              "print(os.getpid())\n")
    config = app_config(make_config)
    async with serving_exporter(config) as (url, store):
        # -S: no site-packages (caretaker's venv, its editable install); only PYTHONPATH and the standard library
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(only), URL_VARIABLE: url}
        result = await asyncio.to_thread(subprocess.run, [python, "-S", "-c", script], env=env, cwd=only,
                                         capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        state = store.states["app"]
        assert (state.pid, state.beats, state.received) == (int(result.stdout), 5, 1)


async def test_beats_are_validated_counted_exposed_and_kept(exporter_for: Any, make_config: MakeConfig,
                                                            tmp_path: Path) -> None:
    config = make_config(service=idle_service(heartbeats=[{"name": "worker", "timeout": "30s"}]))
    client = await exporter_for(config)
    labels = {"service_name": "svc", "heartbeat": "worker"}
    assert value(await scrape_samples(client), "caretaker_heartbeat_beats_total", **labels) == 0
    for bad in ("0", "-1", "abc", "1.5", str(2**53 + 1)):
        resp = await client.post(f"/heartbeat/worker?beats={bad}")
        assert resp.status == 400, bad
        assert "beats must be a positive count" in (await resp.json())["error"]
    assert (await client.post("/heartbeat/worker")).status == 200  # a plain feed: fresh, proves no beat
    data = await scrape_samples(client)
    assert value(data, "caretaker_heartbeat_beats_total", **labels) == 0
    assert value(data, "caretaker_heartbeat_last_timestamp_seconds", **labels) > 0
    assert (await client.post(f"/heartbeat/worker?pid={os.getpid()}&beats=40")).status == 200
    assert (await client.post("/heartbeat/worker?beats=2")).status == 200
    assert value(await scrape_samples(client), "caretaker_heartbeat_beats_total", **labels) == 42
    await client.close()
    assert json.loads((tmp_path / "state.json").read_text())["heartbeats"]["worker"]["beats"] == 42
    again = await exporter_for(config)
    assert value(await scrape_samples(again), "caretaker_heartbeat_beats_total", **labels) == 42


@pytest.mark.parametrize(("text", "error"), [
    ('[]', "a JSON object was expected"),
    ('{"heartbeats": []}', '"heartbeats" must be an object'),
    ('{"heartbeats": ', "Expecting value"),
])
def test_a_state_file_of_another_shape_is_refused_with_a_reason(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        read_saved(path)


def test_bad_entries_of_the_state_file_are_skipped_and_the_rest_read(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 2, "heartbeats": {
        "good": {"last_seen": 17.5, "pid": 42, "beats": 3, "from_a_newer_exporter": "ignored"},
        "text": {"last_seen": "yesterday"}, "flag": {"pid": True}, "nan": {"last_seen": float("nan")},
        "list": [1, 2]}}))
    saved = read_saved(path)
    assert list(saved) == ["good"]
    assert (saved["good"].last_seen, saved["good"].pid, saved["good"].beats, saved["good"].received) == (17.5, 42, 3, 0)
    path.write_text("{}")
    assert read_saved(path) == {}
