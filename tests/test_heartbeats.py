"""Heartbeats: the endpoint and its series, kept across restarts, the reporting
process's liveness, and the client apps use to feed them."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from exporter.app import SCRAPER_KEY, create_app
from exporter.client import Feeder, send
from exporter.heartbeats import HeartbeatStore

from .conftest import Children, free_port
from .test_exporter import config_with, scrape_samples, value


async def test_heartbeat_endpoint_metrics_and_unknown_names(exporter_for: Any, tmp_path: Path) -> None:
    client = await exporter_for(config_with({"heartbeats": [{"name": "worker", "timeout": "30s"}]}, tmp_path))
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


async def test_heartbeats_survive_an_exporter_restart(exporter_for: Any, tmp_path: Path) -> None:
    config = config_with({"heartbeats": [{"name": "worker", "timeout": "1m"}]}, tmp_path)
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



def test_threads_are_not_leaked_by_the_feeder(tmp_path: Path) -> None:
    feeder = Feeder("x", f"http://127.0.0.1:{free_port()}", interval=0.05).start()
    time.sleep(0.2)
    feeder.stop()
    assert not any(t.name == "caretaker-heartbeat-x" for t in threading.enumerate())
