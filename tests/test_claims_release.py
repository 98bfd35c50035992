"""release_claims against a real Redis and real worker processes (tests/claims_worker.py):
exactly the claims still orphaned when it acts are released, once; a claim completed or
re-taken in between is never touched; a live worker, however slow or frozen, keeps its
claim; a reused pid keeps nothing alive."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from exporter.claims import connect
from exporter.config import Config
from exporter.procfs import ProcReader
from receiver.actions import ActionContext, RepairFailed, StepLog
from receiver.claims import AUDIT_IDS, find_orphans, release
from receiver.observe import observe

from .claims_util import claims_config, dead_pid, put_claim, scan, spec_of, start_worker, watch_the_slow_job
from .helpers import Children, free_port, kill_child, samples, scrape, value, wait_until

Release = Callable[[Config], Any]


@pytest.fixture
def r(redis_port: int) -> redis.Redis:
    return redis.Redis(port=redis_port, decode_responses=True)


def step_with(steps: StepLog, key: str) -> dict[str, Any]:
    return next(s for s in steps.steps if key in s)


# --- the repair ---------------------------------------------------------------------------------

async def test_exactly_the_orphaned_claims_are_released(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                        release_claims: Release) -> None:
    now = time.time()
    dead = dead_pid()
    put_claim(r, "dead-1", "w-dead", dead, now - 30)
    put_claim(r, "dead-2", "w-dead", dead, now - 20)
    put_claim(r, "alive", "w-me", os.getpid(), now - 1)
    put_claim(r, "beating", "w-beat", dead, now - 10, heartbeat_ttl=60)
    put_claim(r, "no-owner", "", dead, now - 40)
    r.lpush("task_queue", "waiting")
    config = claims_config(redis_port, tmp_path)
    steps = await release_claims(config)
    assert r.smembers("processing_issues") == {"alive", "beating", "no-owner"}
    assert r.lrange("task_queue", 0, -1) == ["waiting", "dead-1", "dead-2"]  # oldest first, at the right end
    assert r.hgetall("issue:dead-1") == {"status": "queued", "taskType": "summarize"}  # claim fields deleted
    assert r.hget("issue:alive", "status") == "processing"
    released = step_with(steps, "released")
    assert released["released"] == ["dead-1", "dead-2"] and released["released_count"] == 2
    assert step_with(steps, "counts")["counts"] == {"active": 2, "orphaned": 2, "invalid": 1}
    assert any("1 invalid claims left alone" in s["message"] and "no-owner (no_owner)" in s["message"]
               for s in steps.steps)
    # idempotent: nothing is orphaned any more, nothing more is pushed
    again = await release_claims(config)
    assert [s["message"] for s in again.steps][-1] == "no orphaned claims: nothing to release"
    assert r.lrange("task_queue", 0, -1) == ["waiting", "dead-1", "dead-2"]


async def test_releases_per_repair_are_bounded_oldest_first(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                            release_claims: Release) -> None:
    now = time.time()
    for i in range(5):
        put_claim(r, f"j{i}", "w-dead", dead_pid(), now - 100 + i)
    config = claims_config(redis_port, tmp_path, release={"max_per_repair": 2})
    steps = await release_claims(config)
    assert r.lrange("task_queue", 0, -1) == ["j0", "j1"]
    assert "3 more orphaned claims wait for the next attempt" in steps.steps[-1]["message"]
    await release_claims(config)
    await release_claims(config)
    assert r.lrange("task_queue", 0, -1) == ["j0", "j1", "j2", "j3", "j4"]


async def test_the_audit_lists_at_most_fifty_ids_and_the_count(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                               release_claims: Release) -> None:
    now = time.time()
    dead = dead_pid()
    for i in range(120):
        put_claim(r, f"{i:03}", "w-dead", dead, now - 1000 + i)
    steps = await release_claims(claims_config(redis_port, tmp_path, release={"max_per_repair": 500}))
    released = step_with(steps, "released")
    assert released["released_count"] == 120
    assert released["released"] == [f"{i:03}" for i in range(AUDIT_IDS)]
    assert released["message"].endswith("049 and 70 more")
    assert r.llen("task_queue") == 120


async def test_other_layouts_and_release_operations(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                    release_claims: Release) -> None:
    config = claims_config(redis_port, tmp_path, claimed_key="busy", claimed_type="zset", item_key="job:{id}",
                           owner_field="worker", claim_time_field="at", claim_time_format="epoch_seconds",
                           host_field=None, release={"push_to": "retry", "push_end": "left",
                                                     "set_fields": {"state": "retry", "note": "released"},
                                                     "delete_fields": ["worker"]})
    r.zadd("busy", {"a": 1, "b": 2})
    r.hset("job:a", mapping={"worker": "w1", "at": f"{time.time() - 9:.3f}", "pid": str(dead_pid()), "state": "x"})
    r.hset("job:b", mapping={"worker": "w2", "at": f"{time.time():.3f}", "pid": str(os.getpid())})
    r.rpush("retry", "older")
    await release_claims(config)
    assert r.zrange("busy", 0, -1) == ["b"]
    assert r.lrange("retry", 0, -1) == ["a", "older"]
    job = r.hgetall("job:a")
    assert "worker" not in job and job["state"] == "retry" and job["note"] == "released" and "pid" in job


async def test_a_dead_redis_fails_the_repair_with_the_reason(tmp_path: Path, release_claims: Release) -> None:
    with pytest.raises(RepairFailed, match=r"claims could not be read \(connection\)"):
        await release_claims(claims_config(free_port(), tmp_path))


@pytest.mark.parametrize("change", ["completed", "re-taken by another worker", "claim time changed",
                                    "heartbeat back"])
def test_a_claim_that_changed_between_detection_and_release_is_not_touched(
        r: redis.Redis, redis_port: int, tmp_path: Path, change: str) -> None:
    """The race: the scan finds the claim orphaned, then the claim changes, then the
    release runs. Only the Lua script's atomic re-check stands between them."""
    now = time.time()
    put_claim(r, "17", "w-dead", dead_pid(), now - 30)
    put_claim(r, "18", "w-dead", dead_pid(), now - 20)  # unchanged: released
    config = claims_config(redis_port, tmp_path)
    spec = spec_of(config)
    client = connect(spec, tmp_path)
    seen = find_orphans(client, spec, ProcReader())
    assert [c.id_text for c in seen.orphans] == ["17", "18"]
    if change == "completed":
        r.srem("processing_issues", "17")
        r.hset("issue:17", "status", "done")
    elif change == "re-taken by another worker":
        r.hset("issue:17", mapping={"processId": "w-new", "pid": str(os.getpid())})
    elif change == "claim time changed":  # the same owner claimed it again
        r.hset("issue:17", "startTime", "2026-12-02T13:00:00.000Z")
    else:
        r.set("heartbeat:w-dead", "1", ex=60)
    before = r.hgetall("issue:17")
    outcome = release(client, spec, seen.orphans)
    expected = {"completed": "completed", "heartbeat back": "heartbeat"}.get(change, "retaken")
    assert [(c.id_text, o) for c, o in outcome.outcomes] == [
        ("17", expected), ("18", "released" if change != "heartbeat back" else "heartbeat")]
    assert r.hgetall("issue:17") == before
    assert "17" not in r.lrange("task_queue", 0, -1)
    assert (r.sismember("processing_issues", "17") == 1) == (change != "completed")


async def test_the_observation_holds_while_some_claims_are_orphaned(r: redis.Redis, redis_port: int,
                                                                    tmp_path: Path) -> None:
    config = claims_config(redis_port, tmp_path)
    async with aiohttp.ClientSession() as session:
        ctx = ActionContext(config, session, ProcReader())
        put_claim(r, "1", "w-me", os.getpid(), time.time() - 1)
        seen = await observe(ctx, "worker", "CaretakerClaimsOrphaned")
        assert (seen.holds, seen.condition) == (False, "1 claims: 0 orphaned, 1 active, 0 invalid")
        put_claim(r, "2", "w-dead", dead_pid(), time.time() - 1)
        seen = await observe(ctx, "worker", "CaretakerClaimsOrphaned")
        assert (seen.holds, seen.condition) == (True, "2 claims: 1 orphaned, 1 active, 0 invalid")
        ctx = ActionContext(claims_config(free_port(), tmp_path), session, ProcReader())
        seen = await observe(ctx, "worker", "CaretakerClaimsOrphaned")
        assert seen.holds is None and seen.condition.startswith("claims could not be read (connection)")


# --- real workers -----------------------------------------------------------------------------

async def wait_started(r: redis.Redis, job: str, times: int = 1) -> None:
    await wait_until(lambda: int(r.get(f"started:{job}") or 0) >= times, 15, what=f"a worker to start {job}")


async def test_a_worker_killed_mid_job_loses_nothing(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                     exporter_for: Any, children: Children,
                                                     release_claims: Release) -> None:
    """Orphaned within the heartbeat TTL plus a scrape, released once, then picked up by
    another worker and finished exactly once."""
    ttl = 1.5
    r.hset("issue:job-1", "seconds", "60")
    r.lpush("task_queue", "job-1")
    first = start_worker(children, redis_port, "first", "--ttl", str(ttl), log=tmp_path / "first.log")
    await wait_started(r, "job-1")
    config = claims_config(redis_port, tmp_path)
    exporter = await exporter_for(config)
    svc = {"service_name": "worker"}
    assert value(samples(await scrape(exporter)), "caretaker_claims", state="active", **svc) == 1
    killed_at = time.monotonic()
    await kill_child(first)
    second = start_worker(children, redis_port, "second", "--ttl", str(ttl), log=tmp_path / "second.log")
    while value(samples(await scrape(exporter)), "caretaker_claims", state="orphaned", **svc) != 1:
        assert time.monotonic() - killed_at < ttl + 2.0, "not orphaned within the heartbeat TTL plus a scrape"
        await asyncio.sleep(0.25)  # the scrape interval
    assert r.smembers("processing_issues") == {"job-1"}, "nobody took the claimed job"
    r.hset("issue:job-1", "seconds", "0.2")  # the second run is quick
    steps = await release_claims(config)
    assert step_with(steps, "released")["released"] == ["job-1"]
    again = await release_claims(config)
    assert [s["message"] for s in again.steps][-1] == "no orphaned claims: nothing to release"
    await wait_until(lambda: r.lrange("finished", 0, -1) == ["job-1"], 15, what="the second worker to finish job-1")
    await asyncio.sleep(0.5)  # a while in which a second run of it would show
    assert (r.get("started:job-1"), r.get("done:job-1")) == ("2", "1")
    assert r.lrange("finished", 0, -1) == ["job-1"]
    assert r.smembers("processing_issues") == set() and r.llen("task_queue") == 0
    assert r.hget("issue:job-1", "status") == "done"
    assert second.poll() is None


async def test_a_slow_worker_that_lives_is_never_released(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                          children: Children, release_claims: Release) -> None:
    ttl = 0.6
    r.hset("issue:slow", "seconds", "5")  # more than 8 heartbeat TTLs
    r.lpush("task_queue", "slow")
    start_worker(children, redis_port, "slow", "--ttl", str(ttl), log=tmp_path / "slow.log")
    await wait_started(r, "slow")
    config = claims_config(redis_port, tmp_path)
    looks = await watch_the_slow_job(r, config, release_claims)
    assert looks[-1] - looks[0] > 6 * ttl, "looked at it throughout the job, not only at its start"
    await wait_until(lambda: r.lrange("finished", 0, -1) == ["slow"], 5, what="the worker to finish")
    assert (r.get("started:slow"), r.get("done:slow"), r.llen("task_queue")) == ("1", "1", 0)


async def test_a_frozen_worker_keeps_its_claim_until_it_dies(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                             children: Children, release_claims: Release) -> None:
    """Its heartbeat lapses, but its process lives: not orphaned (restarting it is the
    job of CaretakerHeartbeatMissing). Once it is dead, its claim is released."""
    r.hset("issue:frozen", "seconds", "60")
    r.lpush("task_queue", "frozen")
    worker = start_worker(children, redis_port, "frozen", "--ttl", "0.5", log=tmp_path / "frozen.log")
    await wait_started(r, "frozen")
    owner = r.hget("issue:frozen", "processId")
    os.kill(worker.pid, signal.SIGSTOP)
    await wait_until(lambda: not r.exists(f"heartbeat:{owner}"), 5, what="the heartbeat to lapse")
    config = claims_config(redis_port, tmp_path)
    assert scan(config).counts() == {"active": 1, "orphaned": 0, "invalid": 0}
    steps = await release_claims(config)
    assert not any(s.get("released") for s in steps.steps)
    await kill_child(worker)
    (orphan,) = scan(config, keep=5).orphans
    assert orphan.reason == "owner_dead"
    steps = await release_claims(config)
    assert step_with(steps, "released")["released"] == ["frozen"]


async def test_a_reused_pid_does_not_make_a_claim_look_alive(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                             children: Children, release_claims: Release) -> None:
    before = time.time() - 60
    unrelated = children.start(["sleep", "60"])  # has a pid now; started after the first claim
    await wait_until(lambda: ProcReader().stat(unrelated.pid) is not None, 5, what="sleep to run")
    put_claim(r, "old", "w-gone", unrelated.pid, before)
    put_claim(r, "new", "w-sleep", unrelated.pid, time.time() + 0.5)  # claimed after it started: it is the owner
    config = claims_config(redis_port, tmp_path)
    seen = scan(config, keep=5)
    assert [(c.id_text, c.reason) for c in seen.orphans] == [("old", "pid_reused")]
    assert seen.active == 1
    steps = await release_claims(config)
    assert step_with(steps, "released")["released"] == ["old"]
    assert r.smembers("processing_issues") == {"new"}


async def test_a_worker_that_finishes_between_detection_and_release_is_not_touched(
        r: redis.Redis, redis_port: int, tmp_path: Path, children: Children) -> None:
    """A worker on another host (judged by its heartbeat alone) stalls past its TTL, is
    found orphaned, then comes back and completes its job before the release runs."""
    r.hset("issue:late", "seconds", "3")  # the SIGSTOP must land inside the job: 3 s, not a tight 1
    r.lpush("task_queue", "late")
    worker = start_worker(children, redis_port, "remote", "--ttl", "0.5", "--host", "elsewhere",
                          log=tmp_path / "remote.log")
    await wait_started(r, "late")
    os.kill(worker.pid, signal.SIGSTOP)
    owner = r.hget("issue:late", "processId")
    await wait_until(lambda: not r.exists(f"heartbeat:{owner}"), 5, what="the heartbeat to lapse")
    await asyncio.sleep(3.0)  # past the job's own 3 s: it would have finished, had it not been stopped
    config = claims_config(redis_port, tmp_path)
    spec = spec_of(config)
    client = connect(spec, tmp_path)
    seen = find_orphans(client, spec, ProcReader())
    assert [(c.id_text, c.reason) for c in seen.orphans] == [("late", "heartbeat_absent")]
    os.kill(worker.pid, signal.SIGCONT)
    await wait_until(lambda: r.lrange("finished", 0, -1) == ["late"] and not r.smembers("processing_issues"), 10,
                     what="the worker to complete its job")
    outcome = release(client, spec, seen.orphans)
    assert [o for _, o in outcome.outcomes] == ["completed"]
    assert r.llen("task_queue") == 0 and r.hget("issue:late", "status") == "done"
    assert (r.get("started:late"), r.get("done:late")) == ("1", "1")
