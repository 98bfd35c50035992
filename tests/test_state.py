"""The state interface (receiver/state.py) against both implementations: the state file
of a lone receiver and a real Redis shared by an HA pair."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from receiver.executor import Executor
from receiver.metrics import ReceiverMetrics
from receiver.payload import Alert, Decision
from receiver.shared import SharedState, SharedStateError, key_prefix
from receiver.state import LOCAL_LOCK, LocalState, RepairState
from receiver.store import NewAlert, Store
from receiver.vocabulary import AuditDecision, EntryState, Reason, RepairResult

from .helpers import MakeConfig, free_port

STARTS = "2026-11-22T03:00:00.000000+00:00"


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> int | None:
    """None for the state file alone; for Redis, the port of a fresh one (started here,
    off the event loop, as Redis is waited for)."""
    return None if request.param == "sqlite" else int(request.getfixturevalue("redis_port"))


@pytest.fixture
async def state(backend: int | None, tmp_path: Path) -> AsyncIterator[tuple[RepairState, Store]]:
    """A RepairState of each kind, with the state file of its receiver."""
    store = Store(tmp_path / "state.sqlite")
    client = None
    try:
        if backend is None:
            yield LocalState(store), store
        else:
            client = aioredis.Redis(host="127.0.0.1", port=backend)
            yield SharedState(client, f"test-{uuid.uuid4().hex[:8]}:", 3600, store), store
    finally:
        if client is not None:
            await client.aclose()
        store.close()


@pytest.fixture
async def redis_pair(redis_port: int) -> AsyncIterator[tuple[SharedState, SharedState, Any]]:
    """Two receivers' shared states on one Redis, with a client to look at its keys."""
    clients = [aioredis.Redis(host="127.0.0.1", port=redis_port, decode_responses=True) for _ in range(3)]
    prefix = "caretaker:"
    try:
        yield SharedState(clients[0], prefix, 3600), SharedState(clients[1], prefix, 3600), clients[2]
    finally:
        for client in clients:
            await client.aclose()


def alert(fingerprint: str, status: str = "firing", **labels: str) -> Alert:
    return Alert.model_validate({"status": status, "labels": {"alertname": "Down", "service_name": "svc", **labels},
                                 "startsAt": "2026-11-22T03:00:00Z", "fingerprint": fingerprint})


def start_repair(store: Store, service: str, started: float) -> int:
    """The audit row of a repair as the runner writes it before ``record_start``."""
    fingerprint = uuid.uuid4().hex[:12]
    store.admit([NewAlert(fingerprint, STARTS, "firing", "Down", service, "restart", AuditDecision.QUEUED.value, "")],
                started)
    (problem,) = [p for p in store.open_problems(service) if p.fingerprint == fingerprint]
    entry_id = store.record(problem, started, AuditDecision.ACTED, "", None, state=EntryState.RUNNING, attempt=True)
    store.update(entry_id, started_at=started)
    return entry_id


async def repair(state: RepairState, store: Store, service: str, started: float, finished: float) -> None:
    entry_id = start_repair(store, service, started)
    await state.record_start(service, started)
    store.update(entry_id, state=EntryState.DONE, result=RepairResult.SUCCESS, finished_at=finished)
    await state.record_finish(service, finished)


# --- what both do alike -----------------------------------------------------------------------

async def test_repairs_count_in_their_window_until_the_budget_is_reset(state: tuple[RepairState, Store]) -> None:
    repairs, store = state
    assert await repairs.repairs_since("svc", 0.0) == 0
    await repair(repairs, store, "svc", 100.0, 110.0)
    await repair(repairs, store, "svc", 200.0, 230.0)
    assert [await repairs.repairs_since("svc", since) for since in (0.0, 100.0, 100.5, 200.0, 200.5)] == [2, 2, 1, 1, 0]
    assert await repairs.repairs_since("other", 0.0) == 0  # per service
    await repairs.reset_budget("svc", 250.0, "reset by an operator")
    assert await repairs.repairs_since("svc", 0.0) == 0
    await repair(repairs, store, "svc", 260.0, 270.0)
    assert await repairs.repairs_since("svc", 0.0) == 1
    assert store.repairs_since("svc", 0.0) == 1  # the reset is in this receiver's state file too, whichever state


async def test_the_repair_lock_is_taken_given_back_and_taken_again(state: tuple[RepairState, Store]) -> None:
    repairs, _ = state
    token = await repairs.acquire("svc", 30.0)
    assert token is not None
    assert await repairs.acquire("other", 30.0) is not None  # a lock per service
    await repairs.release("svc", token)
    again = await repairs.acquire("svc", 30.0)
    assert again is not None
    await repairs.release("svc", again)


async def test_new_alerts_are_claimed_and_decisions_kept(state: tuple[RepairState, Store]) -> None:
    repairs, _ = state
    alerts = [alert("a1"), alert("a2"), alert("a1", status="resolved")]
    decisions = [Decision("svc", "restart", ""), Decision("svc", "restart", ""), Decision("svc", "restart", "resolved")]
    assert await repairs.claim(alerts, decisions) == decisions
    assert await repairs.claim([], []) == []


# --- where they differ, on purpose ------------------------------------------------------------

async def test_a_lone_receiver_keeps_its_cooldown_in_its_own_schedule(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    try:
        local = LocalState(store)
        await repair(local, store, "svc", 100.0, 110.0)
        assert await local.last_finished("svc") is None  # next_attempt_at holds it; a reset clears that
        assert [d.reason for d in await local.claim([alert("a1")], [Decision("svc", "restart", "")])] == [""]
        assert [d.reason for d in await local.claim([alert("a1")], [Decision("svc", "restart", "")])] == [""]
        assert await local.acquire("svc", 30.0) is not None  # the worker is the lock
        assert await local.acquire("svc", 30.0) is not None
    finally:
        store.close()


async def test_two_receivers_claim_an_alert_once(redis_pair: tuple[SharedState, SharedState, Any]) -> None:
    a, b, _ = redis_pair
    alerts = [alert("a1"), alert("a2"), alert("x9")]
    decisions = [Decision("svc", "restart", ""), Decision("svc", "restart", ""), Decision("", "", "unknown_service")]
    assert await a.claim(alerts[:1], decisions[:1]) == decisions[:1]
    theirs = await b.claim(alerts, decisions)
    assert [d.reason for d in theirs] == [Reason.DUPLICATE, "", "unknown_service"]
    assert [d.reason for d in await a.claim(alerts, decisions)] == [Reason.DUPLICATE, Reason.DUPLICATE,
                                                                   "unknown_service"]


async def test_one_receiver_at_a_time_holds_the_repair_lock(redis_pair: tuple[SharedState, SharedState, Any]) -> None:
    a, b, _ = redis_pair
    token = await a.acquire("svc", 30.0)
    assert token is not None
    assert await b.acquire("svc", 30.0) is None
    await b.release("svc", "not-the-token")  # only the owner releases it
    assert await b.acquire("svc", 30.0) is None
    await a.release("svc", token)
    assert await b.acquire("svc", 30.0) is not None


async def test_the_budget_and_the_cooldown_are_shared(redis_pair: tuple[SharedState, SharedState, Any]) -> None:
    a, b, _ = redis_pair
    assert await b.last_finished("svc") is None
    await a.record_start("svc", 100.0)
    await a.record_finish("svc", 123.5)
    assert (await b.repairs_since("svc", 0.0), await b.last_finished("svc")) == (1, 123.5)
    await b.reset_budget("svc", 200.0, "reset by an operator")
    assert await a.repairs_since("svc", 0.0) == 0
    # A reset makes the next attempt due at once on every receiver: the cooldown of a
    # repair that ended before it no longer holds; one that ends after it does.
    assert await a.last_finished("svc") is None
    await b.record_finish("svc", 250.0)
    assert await a.last_finished("svc") == 250.0


async def test_the_redis_keys_are_those_of_earlier_receivers(redis_pair: tuple[SharedState, SharedState, Any]) -> None:
    """HA deployments keep the keys they have: these names are a contract.

    Changed once, on purpose (issue 13's review): the host now follows the prefix in every
    mode (``caretaker:web-1:``), where before it did only with ``receiver.fleet``, so that
    the two receivers of a pair meet on the same keys while one is switched to fleet mode,
    and hosts sharing one Redis never share a lock or budget. docs/fleet.md says how to
    upgrade a pair (stop both, upgrade, start). The names stay pinned here."""
    a, _, redis = redis_pair
    a = SharedState(a.client, key_prefix("caretaker:", "web-1"), 3600)
    await a.claim([alert("f00d")], [Decision("svc", "restart", "")])
    token = await a.acquire("svc", 30.0)
    await a.record_start("svc", 100.0)
    await a.record_finish("svc", 110.0)
    await a.reset_budget("svc", 120.0, "reset by an operator")
    assert sorted(await redis.keys("*")) == [f"caretaker:web-1:alert:f00d:{STARTS}:firing",
                                             "caretaker:web-1:finished:svc", "caretaker:web-1:lock:svc",
                                             "caretaker:web-1:repairs:svc", "caretaker:web-1:reset:svc"]
    assert await redis.get("caretaker:web-1:lock:svc") == token
    assert (await redis.get("caretaker:web-1:finished:svc"), await redis.get("caretaker:web-1:reset:svc")) == (
        "110.0", "120.0")
    assert [score for _, score in await redis.zrange("caretaker:web-1:repairs:svc", 0, -1, withscores=True)] == [
        100.0]
    assert 3500 < await redis.ttl(f"caretaker:web-1:alert:f00d:{STARTS}:firing") <= 3600
    assert 0 < await redis.pttl("caretaker:web-1:lock:svc") <= 30_000


async def test_every_call_without_redis_is_a_shared_state_error() -> None:
    # No retries (the client's default retries with backoff, seconds per call): one refusal is enough here.
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    down = SharedState(client, "caretaker:", 3600)
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: down.claim([alert("a1")], [Decision("svc", "restart", "")]), lambda: down.acquire("svc", 30.0),
            lambda: down.release("svc", "t"), lambda: down.record_start("svc", 1.0),
            lambda: down.record_finish("svc", 2.0), lambda: down.repairs_since("svc", 0.0),
            lambda: down.last_finished("svc"), lambda: down.reset_budget("svc", 3.0, "r")]
        for call in calls:
            with pytest.raises(SharedStateError):
                await call()
    finally:
        await client.aclose()


class LosesCancellations(LocalState):
    """A state whose lock call swallows a cancellation that lands in it, as redis-py's
    asyncio client (8.1) often does mid-command: what no test can make Redis do at will."""

    swallowed = 0

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.acquiring = asyncio.Event()

    async def acquire(self, service: str, lease_seconds: float) -> str | None:
        self.acquiring.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            self.swallowed += 1
        return LOCAL_LOCK


async def test_stop_ends_a_worker_whose_state_lost_its_cancellation(make_config: MakeConfig, tmp_path: Path) -> None:
    config = make_config(service={"match": {"comm": "^caretaker-none$"}, "start": {"argv": ["/bin/true"]},
                                  "remediation": {"allow": ["restart"]}})
    store = Store(tmp_path / "state.sqlite")
    state = LosesCancellations(store)
    executor = Executor(config, store, state, cast(Any, None), ReceiverMetrics(CollectorRegistry(), config))
    try:
        await executor.pause("svc", None, "only the worker's life is looked at")  # its look needs no /proc
        await executor.admit([alert("a1", remediation="restart")])
        await asyncio.wait_for(state.acquiring.wait(), 5)  # the worker is in acquire()
        await asyncio.wait_for(executor.stop(), 5)
        assert state.swallowed == 1
        assert executor.pending == 0
    finally:
        store.close()
