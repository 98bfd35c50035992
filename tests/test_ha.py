"""Two receivers (one per Alertmanager in HA mode) sharing state through a real Redis."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from exporter.config import parse_config
from exporter.procfs import ProcReader, scan_services
from receiver.app import EXECUTOR_KEY, create_app

from .conftest import free_port, leave_alone, settle, stop_config_services
from .test_receiver import AUTH, TOKEN, alert, notification

Client = TestClient[web.Request, web.Application]


def ha_config(tmp_path: Path, name: str, redis_port: int, mark: str, prefix: str, **receiver: Any) -> Any:
    (tmp_path / "token").write_text(TOKEN)
    return parse_config({
        "receiver": {"bearer_token": {"file": "token"}, "state_file": f"{name}.sqlite", "cooldown": 0,
                     "shared_state": {"port": redis_port, "key_prefix": prefix}, **receiver},
        "services": {"svc": {
            "match": {"cmdline": f"{mark}$"},
            "start": {"argv": [sys.executable, "-c", "import time\nwhile True: time.sleep(1)", mark]},
            "stop": {"grace_period": 1},
            "remediation": {"allow": ["restart"], "verify_timeout": 10}}}}, base_dir=tmp_path)


@pytest.fixture
async def pair(redis_server: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    port = free_port()
    redis_server(port)
    made: list[tuple[Client, Any]] = []

    async def make(**receiver: Any) -> tuple[Client, Client]:
        mark, prefix = f"ha-{uuid.uuid4().hex[:10]}", f"test-{uuid.uuid4().hex[:8]}:"
        clients = []
        for name in ("a", "b"):
            config = ha_config(tmp_path, name, port, mark, prefix, **receiver)
            client = TestClient(TestServer(create_app(config), host="127.0.0.1"))
            await client.start_server()
            made.append((client, config))
            clients.append(client)
        return clients[0], clients[1]

    yield make
    for client, _ in made:
        await leave_alone(client)
    for client, config in made:
        stop_config_services(config)
        await client.close()


async def test_the_same_notification_to_two_receivers_repairs_once(pair: Any) -> None:
    a, b = await pair()
    payload = notification(alert("ha1", service_name="svc", remediation="restart"))
    answers = await asyncio.gather(*(c.post("/alerts", json=payload, headers=AUTH) for c in (a, b)))
    assert [r.status for r in answers] == [200, 200]
    entries = await settle(a) + await settle(b)
    assert sorted(e["decision"] for e in entries) == ["acted", "skipped"]
    (skipped,) = [e for e in entries if e["decision"] == "skipped"]
    assert skipped["reason"] == "duplicate"


async def test_one_receiver_at_a_time_repairs_a_service(pair: Any) -> None:
    a, b = await pair(cooldown="1h")
    await asyncio.gather(
        a.post("/alerts", json=notification(alert("x1", service_name="svc", remediation="restart")), headers=AUTH),
        b.post("/alerts", json=notification(alert("x2", service_name="svc", remediation="restart")), headers=AUTH))
    deadline = time.monotonic() + 20
    while True:  # the one that did not repair looks again until it sees the service healthy
        entries = await settle(a) + await settle(b)
        if any(e["reason"] == "condition_cleared" for e in entries) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert sorted(e["decision"] for e in entries if e["decision"] == "acted") == ["acted"]
    assert {e["reason"] for e in entries if e["decision"] == "skipped"} <= {"in_progress", "cooldown",
                                                                            "condition_cleared"}
    assert len(scan_services(ProcReader(), a.server.app[EXECUTOR_KEY].config.services, (os.getpid(),))["svc"]) == 1


async def test_the_budget_is_shared(pair: Any) -> None:
    a, b = await pair(attempts={"max": 1, "window": "1h"})
    await a.post("/alerts", json=notification(alert("y1", service_name="svc", remediation="restart")), headers=AUTH)
    assert (await settle(a))[0]["result"] == "success"
    stop_config_services(a.server.app[EXECUTOR_KEY].config)  # it dies again
    await b.post("/alerts", json=notification(alert("y2", service_name="svc", remediation="restart")), headers=AUTH)
    deadline = time.monotonic() + 10
    while (reasons := [e["reason"] for e in await settle(b)]) and reasons[0] == "in_progress":
        assert time.monotonic() < deadline, reasons  # a held the lock while it looked; b looks again
        await asyncio.sleep(0.1)
    assert reasons[0] == "budget_exhausted"
    assert not [e for e in await settle(b) if e["decision"] == "acted"]


async def test_without_redis_nothing_is_repaired_and_alertmanager_retries(tmp_path: Path) -> None:
    config = ha_config(tmp_path, "solo", free_port(), f"ha-{uuid.uuid4().hex[:10]}", "down:")
    client = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    try:
        resp = await client.post("/alerts", json=notification(alert("z1", service_name="svc", remediation="restart")),
                                 headers=AUTH)
        assert resp.status == 503
        assert "retry" in (await resp.json())["error"]
        assert await settle(client) == []  # nothing recorded: the retry is acted on normally
    finally:
        stop_config_services(config)
        await client.close()


async def test_resends_keep_the_problem_open_on_the_receiver_that_owns_it(pair: Any) -> None:
    a, _ = await pair(problem_ttl="2s")
    await a.post("/api/v1/services/svc/pause", headers=AUTH)  # only the problem's life is looked at
    payload = notification(alert("keep", service_name="svc", remediation="restart"))
    for _ in range(8):  # Alertmanager's resends, every 0.5 s for 4 s: each is a duplicate claim in Redis
        assert (await a.post("/alerts", json=payload, headers=AUTH)).status == 200
        await asyncio.sleep(0.5)
    resp = await a.get("/api/v1/problems", headers=AUTH)
    (problem,) = (await resp.json())["data"]
    assert problem["state"] == "open" and problem["times_seen"] == 8
