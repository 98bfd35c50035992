"""Two receivers (one per Alertmanager in HA mode) sharing state through a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from exporter.config import Config
from receiver.app import EXECUTOR_KEY

from .helpers import AUTH, Client, MakeConfig, alert, free_port, notification, pids, settle, sleeper, stop_services


def ha_config(make_config: MakeConfig, name: str, redis_port: int, service: dict[str, Any], prefix: str,
              **receiver: Any) -> Config:
    """Receiver ``name`` of a pair: its own state file, the state it shares in Redis."""
    return make_config(service=service, token=True, state_file=f"{name}.sqlite",
                       shared_state={"port": redis_port, "key_prefix": prefix}, **receiver)


@pytest.fixture
def pair(receiver_for: Any, make_config: MakeConfig,
         redis_port: int) -> Callable[..., Awaitable[tuple[Client, Client]]]:
    """pair(**receiver) -> two receivers of one service, sharing their state in one Redis."""
    async def make(**receiver: Any) -> tuple[Client, Client]:
        service, prefix = sleeper(), f"test-{uuid.uuid4().hex[:8]}:"
        a, b = [await receiver_for(ha_config(make_config, name, redis_port, service, prefix, **receiver))
                for name in ("a", "b")]
        return a, b
    return make


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
    assert len(pids(a.server.app[EXECUTOR_KEY].config)) == 1


async def test_the_budget_is_shared(pair: Any) -> None:
    a, b = await pair(attempts={"max": 1, "window": "1h"})
    await a.post("/alerts", json=notification(alert("y1", service_name="svc", remediation="restart")), headers=AUTH)
    assert (await settle(a))[0]["result"] == "success"
    await stop_services(a.server.app[EXECUTOR_KEY].config)  # it dies again
    await b.post("/alerts", json=notification(alert("y2", service_name="svc", remediation="restart")), headers=AUTH)
    deadline = time.monotonic() + 10
    while (reasons := [e["reason"] for e in await settle(b)]) and reasons[0] == "in_progress":
        assert time.monotonic() < deadline, reasons  # a held the lock while it looked; b looks again
        await asyncio.sleep(0.1)
    assert reasons[0] == "budget_exhausted"
    assert not [e for e in await settle(b) if e["decision"] == "acted"]


async def test_without_redis_nothing_is_repaired_and_alertmanager_retries(receiver_for: Any,
                                                                          make_config: MakeConfig) -> None:
    client = await receiver_for(ha_config(make_config, "solo", free_port(), sleeper(), "down:"))
    resp = await client.post("/alerts", json=notification(alert("z1", service_name="svc", remediation="restart")),
                             headers=AUTH)
    assert resp.status == 503
    assert "retry" in (await resp.json())["error"]
    assert await settle(client) == []  # nothing recorded: the retry is acted on normally


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


async def test_a_flood_of_notifications_uses_a_bounded_number_of_redis_connections(
        receiver_for: Any, make_config: MakeConfig, redis_server: Any) -> None:
    import redis as sync_redis

    from receiver.app import SHARED_STATE_CONNECTIONS

    port = free_port()
    await asyncio.to_thread(redis_server, port)  # its own Redis: every client of it is this receiver's
    a = await receiver_for(ha_config(make_config, "a", port, sleeper(), "flood:"))
    await a.post("/api/v1/services/svc/pause", headers=AUTH)  # only admission is looked at
    flood = [notification(alert(f"fl{i}", alertname=f"Flood{i}", service_name="svc", remediation="restart"))
             for i in range(200)]
    answers = await asyncio.gather(*(a.post("/alerts", json=payload, headers=AUTH) for payload in flood))
    assert {r.status for r in answers} == {200}
    watcher = sync_redis.Redis(port=port)
    try:
        clients = watcher.client_list()
    finally:
        watcher.close()
    assert 1 < len(clients) <= SHARED_STATE_CONNECTIONS + 1, clients  # the receiver's pool, and the watcher
