"""The exporter app: series, values, probes, deadlines, exposition format."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from exporter.app import REGISTRY_KEY, SCRAPER_KEY
from exporter.procfs import ProcReader

from .helpers import (
    CLK_TCK,
    PAGE,
    FakeProc,
    MakeConfig,
    free_port,
    idle_service,
    require_binary,
    samples,
    scrape,
    serving,
    value,
)


@pytest.fixture
def client_for(exporter_for: Any, fake_proc: FakeProc) -> Callable[..., Any]:
    """An exporter client reading the fake /proc tree unless another reader is given."""
    def make(config: Any, reader: ProcReader | None = None) -> Any:
        return exporter_for(config, reader or ProcReader(fake_proc.root, CLK_TCK, PAGE))
    return make


async def test_every_series_exists_from_the_first_scrape_with_zero(client_for: Any, make_config: MakeConfig) -> None:
    dead = free_port()
    config = make_config({"never": {
        "match": {"comm": "^never-started$"}, "processes": {"min": 1, "max": 1},
        "probes": [{"name": "port", "type": "tcp", "port": dead},
                   {"name": "web", "type": "http", "url": f"http://127.0.0.1:{dead}/"}],
        "limits": {"memory_bytes": 1000}}})
    data = samples(await scrape(await client_for(config)))
    svc = {"service_name": "never"}
    assert value(data, "caretaker_service_processes", **svc) == 0
    assert value(data, "caretaker_service_min_processes", **svc) == 1
    assert value(data, "caretaker_service_max_processes", **svc) == 1
    assert value(data, "caretaker_service_resident_memory_bytes", **svc) == 0
    assert value(data, "caretaker_service_cpu_seconds_total", **svc) == 0
    assert value(data, "caretaker_service_open_fds", **svc) == 0
    assert value(data, "caretaker_service_oldest_start_time_seconds", **svc) == 0
    assert value(data, "caretaker_service_processes_by_status", status="stopped", **svc) == 0
    assert value(data, "caretaker_probe_success", probe="port", type="tcp", **svc) == 0
    assert value(data, "caretaker_probe_success", probe="web", type="http", **svc) == 0
    assert ("caretaker_probe_duration_seconds", frozenset({**svc, "probe": "web", "type": "http"}.items())) in data
    assert value(data, "caretaker_service_health_ratio", **svc) == 0
    for component in ("processes", "probes", "resources"):
        assert value(data, "caretaker_service_health_component_ratio", component=component, **svc) == 0
    assert value(data, "caretaker_exporter_errors_total", reason="scan_timeout") == 0
    assert value(data, "caretaker_exporter_scrape_duration_seconds") > 0


async def test_values_from_processes_and_health_components(client_for: Any, fake_proc: FakeProc,
                                                           make_config: MakeConfig) -> None:
    fake_proc.add(100, comm="worker", start_ticks=200, utime=300, stime=100, rss_pages=10, fds=3)
    fake_proc.add(101, comm="worker", start_ticks=100, utime=100, rss_pages=5, fds=2, state="T")
    fake_proc.add(102, comm="worker", start_ticks=300, rss_pages=1, fds=1)
    config = make_config({"w": {"match": {"comm": "^worker$"}, "processes": {"min": 1, "max": 2},
                                "limits": {"memory_bytes": 100 * PAGE, "open_fds": 2}}})
    data = samples(await scrape(await client_for(config)))
    svc = {"service_name": "w"}
    assert value(data, "caretaker_service_processes", **svc) == 3
    assert value(data, "caretaker_service_processes_by_status", status="stopped", **svc) == 1
    assert value(data, "caretaker_service_processes_by_status", status="sleeping", **svc) == 2
    assert value(data, "caretaker_service_resident_memory_bytes", **svc) == 16 * PAGE
    assert value(data, "caretaker_service_cpu_seconds_total", **svc) == 5.0
    assert value(data, "caretaker_service_open_fds", **svc) == 6
    assert value(data, "caretaker_service_oldest_start_time_seconds", **svc) == 1_700_000_000 + 1.0
    # 3 processes, max 2: processes 2/3; memory fine, one process over 2 fds: resources 1/2
    parts = {c: value(data, "caretaker_service_health_component_ratio", component=c, **svc)
             for c in ("processes", "resources")}
    assert parts == pytest.approx({"processes": 2 / 3, "resources": 0.5})
    expected = (30 * 2 / 3 + 20 * 0.5) / 50
    assert value(data, "caretaker_service_health_ratio", **svc) == pytest.approx(expected)


async def test_promtool_check_metrics_is_clean(client_for: Any, fake_proc: FakeProc, make_config: MakeConfig) -> None:
    promtool = require_binary("promtool")
    fake_proc.add(100, comm="worker", rss_pages=10, fds=3)
    config = make_config({"w": {"match": {"comm": "^worker$"},
                                "probes": [{"name": "p", "type": "tcp", "port": free_port()}],
                                "limits": {"memory_bytes": 10}}})
    text = await scrape(await client_for(config))
    result = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True,
                                     text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


async def test_probes_pass_against_live_servers(client_for: Any, make_config: MakeConfig) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok", status=204 if request.path == "/empty" else 200)

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    async with serving(app) as port:
        config = make_config({"s": {"match": {"comm": "^nothing$"}, "probes": [
            {"name": "tcp", "type": "tcp", "port": port},
            {"name": "ok", "type": "http", "url": f"http://127.0.0.1:{port}/health"},
            {"name": "wrong_status", "type": "http", "url": f"http://127.0.0.1:{port}/empty"},
            {"name": "empty_ok", "type": "http", "url": f"http://127.0.0.1:{port}/empty", "expect_status": [204]},
        ]}})
        client = await client_for(config)
        data = samples(await scrape(client))
        ok = {name: value(data, "caretaker_probe_success", service_name="s", probe=name,
                          type="tcp" if name == "tcp" else "http")
              for name in ("tcp", "ok", "wrong_status", "empty_ok")}
        assert ok == {"tcp": 1, "ok": 1, "wrong_status": 0, "empty_ok": 1}
        assert value(data, "caretaker_service_health_component_ratio", service_name="s", component="probes") == 0.75
        result = client.server.app[SCRAPER_KEY].snapshot.services["s"].probes["wrong_status"]
        assert (result.reason, result.detail) == ("status", "HTTP 204, expected [200]")


async def test_scrape_respects_prometheus_scrape_timeout(client_for: Any, make_config: MakeConfig) -> None:
    """A server that accepts and never answers: the probe is cut at the scrape's deadline."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        config = make_config({"s": {"match": {"comm": "^nothing$"}, "probes": [
            {"name": "hang", "type": "http", "url": f"http://127.0.0.1:{port}/", "timeout": "30s"}]}})
        client = await client_for(config)
        started = time.monotonic()
        data = samples(await scrape(client, timeout="1.5"))
        elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"scrape took {elapsed:.2f}s with a 1.5s scrape timeout"
    assert value(data, "caretaker_probe_success", service_name="s", probe="hang", type="http") == 0
    snap = client.server.app[SCRAPER_KEY].snapshot
    assert snap.services["s"].probes["hang"].reason == "timeout"


async def test_concurrent_scrapes_share_one_collection(client_for: Any, fake_proc: FakeProc,
                                                       make_config: MakeConfig) -> None:
    calls = 0

    class Counting(ProcReader):
        def listing(self) -> list[tuple[str, int]]:
            nonlocal calls
            calls += 1
            time.sleep(0.3)  # a slow /proc, in the scan thread
            return super().listing()

    config = make_config({"w": {"match": {"comm": "^worker$"}}})
    client = await client_for(config, Counting(fake_proc.root, CLK_TCK, PAGE))
    await asyncio.gather(*(scrape(client) for _ in range(5)))
    assert calls == 1
    registry = client.server.app[REGISTRY_KEY]
    assert registry.get_sample_value("caretaker_service_processes", {"service_name": "w"}) == 0


async def test_slow_scan_does_not_block_the_event_loop(client_for: Any, fake_proc: FakeProc,
                                                       make_config: MakeConfig) -> None:
    # The scan waits until the event loop has run 20 ticks meanwhile: it ends at once if
    # the loop runs beside it, and only after 10 s, without the ticks, if it blocks it.
    ticked = threading.Event()
    waited: list[bool] = []

    class Slow(ProcReader):
        def listing(self) -> list[tuple[str, int]]:
            waited.append(ticked.wait(10))
            return super().listing()

    client = await client_for(make_config({"w": {"match": {"comm": "x"}}}),
                              Slow(fake_proc.root, CLK_TCK, PAGE))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
            if ticks >= 20:
                ticked.set()

    task = asyncio.create_task(ticker())
    await scrape(client)
    task.cancel()
    assert waited and all(waited), f"the event loop did not run while the scan waited ({ticks} ticks)"


async def test_scan_timeout_keeps_previous_view_and_counts_error(client_for: Any, fake_proc: FakeProc,
                                                                 make_config: MakeConfig) -> None:
    delay = 0.0

    class Sometimes(ProcReader):
        def listing(self) -> list[tuple[str, int]]:
            time.sleep(delay)
            return super().listing()

    fake_proc.add(100, comm="worker")
    client = await client_for(make_config({"w": {"match": {"comm": "^worker$"}}}),
                              Sometimes(fake_proc.root, CLK_TCK, PAGE))
    assert value(samples(await scrape(client)), "caretaker_service_processes", service_name="w") == 1
    delay = 2.0
    data = samples(await scrape(client, timeout="1"))
    assert value(data, "caretaker_service_processes", service_name="w") == 1
    assert value(data, "caretaker_exporter_errors_total", reason="scan_timeout") == 1


async def test_promtool_clean_on_a_scrape_with_every_kind_of_series(exporter_for: Any, make_config: MakeConfig,
                                                                     tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    (tmp_path / "s.json").write_text("{}")
    (tmp_path / "app.log").write_text("")
    config = make_config(service=idle_service(**{
        "probes": [{"name": "tcp", "type": "tcp", "port": free_port()},
                   {"name": "web", "type": "http", "url": f"https://127.0.0.1:{free_port()}/"},
                   {"name": "cmd", "type": "exec", "argv": ["true"]}],
        "heartbeats": [{"name": "hb", "timeout": "10s"}], "logs": [{"path": "app.log"}],
        "files": [{"path": "s.json", "format": "json"}], "directories": [{"path": "."}], "data_paths": ["."],
        "ports": [free_port()], "limits": {"memory_bytes": 10**9, "open_fds": 100}}))
    client = await exporter_for(config)
    await client.post("/heartbeat/hb")
    text = await (await client.get("/metrics")).text()
    result = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True,
                                     text=True, timeout=30)
    assert result.returncode == 0 and not (result.stdout + result.stderr), result.stdout + result.stderr
    names = {k[0] for k in samples(text)}
    for expected in ("caretaker_probe_failure_reason", "caretaker_probe_tls_cert_expiry_timestamp_seconds",
                     "caretaker_heartbeat_process_alive", "caretaker_log_pattern_matches_total",
                     "caretaker_file_valid", "caretaker_filesystem_avail_bytes", "caretaker_service_port_conflict",
                     "caretaker_service_memory_limit_bytes"):
        assert expected in names, expected

