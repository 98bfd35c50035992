"""caretaker_client.claims where things go wrong, against a real Redis: a queue of the
wrong type, a Redis that stops answering mid-way, threads of one process working on the
same item, many clients, bad URLs. The app's work is never hurt and no job is lost."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import redis

import caretaker_client.claims as claims_module
from caretaker_client.claims import ENV_URL, claim, take

from .conftest import wait_for


@pytest.fixture
def r(redis_port: int) -> redis.Redis:
    return redis.Redis(port=redis_port, decode_responses=True)


def client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=2)


def test_a_release_to_a_queue_of_the_wrong_type_changes_nothing(r: redis.Redis, redis_port: int) -> None:
    """The finish script removed the claim before RPUSH failed: the job was lost."""
    r.zadd("task_queue", {"other": 1})
    with pytest.raises(RuntimeError), claim("9", redis=client(redis_port)) as held:
        item = r.hgetall("issue:9")
        raise RuntimeError("the work failed: release it")
    assert held.result == "error"
    assert r.smembers("processing_issues") == {"9"}  # still claimed, by this process: nothing lost
    assert r.hgetall("issue:9") == item
    assert r.zrange("task_queue", 0, -1) == ["other"]


def test_a_thread_never_finishes_another_threads_claim_of_the_same_item(r: redis.Redis, redis_port: int) -> None:
    """Threads of a process share its owner id. Thread 1 held 5 too long, caretaker released
    it, thread 2 took it again; thread 1 ending compared only the owner and completed
    thread 2's live claim."""
    c = client(redis_port)
    first = claim("5", redis=c).__enter__()
    # caretaker's release, as its script does it
    r.srem("processing_issues", "5")
    r.hdel("issue:5", "processId", "pid", "host", "startTime")
    r.hset("issue:5", "status", "queued")
    r.rpush("task_queue", "5")
    second = take(timeout=1, redis=c)
    assert second is not None and second.item_id == "5" and second.owner == first.owner
    with second:
        taken = r.hgetall("issue:5")
        first.__exit__(None, None, None)
        assert first.result == "lost"
        assert r.smembers("processing_issues") == {"5"} and r.hgetall("issue:5") == taken
    assert second.result == "done"
    assert r.smembers("processing_issues") == set() and r.hget("issue:5", "status") == "done"


def test_claims_of_one_process_have_distinct_claim_times(r: redis.Redis, redis_port: int) -> None:
    c = client(redis_port)
    held = [claim(str(i), redis=c).__enter__() for i in range(50)]
    times = {r.hget(f"issue:{i}", "startTime") for i in range(50)}
    assert len(times) == 50
    for h in held:
        h.__exit__(None, None, None)


def keepers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "caretaker-claims-heartbeat"]


def test_one_heartbeat_thread_per_process_gone_when_idle(r: redis.Redis, redis_port: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread per client object, kept for ever: an app making a client per job had 20
    threads after 20 jobs, each holding its client."""
    monkeypatch.setattr(claims_module, "KEEPER_IDLE_SECONDS", 0.2, raising=False)
    made = []
    held = []
    for i in range(20):  # an app that makes a client per job
        made.append(weakref.ref(c := client(redis_port)))
        held.append(claim(str(i), redis=c, heartbeat_ttl=0.6).__enter__())
        assert len(keepers()) == 1
    owner = held[0].owner
    for _ in range(6):  # 1.2 s: two TTLs, refreshed through all 20 clients by the one thread
        assert r.exists(f"heartbeat:{owner}")
        time.sleep(0.2)
    for h in held:
        h.__exit__(None, None, None)
    del h, held, c
    wait_for(lambda: not keepers(), 5, what="the idle heartbeat thread to end")
    gc.collect()
    assert not [ref for ref in made if ref() is not None], "a client outlived its claims"
    with claim("again", redis=client(redis_port), heartbeat_ttl=0.6) as again:  # started again on demand
        assert len(keepers()) == 1
        time.sleep(1.0)
        assert r.exists(f"heartbeat:{again.owner}")


@pytest.mark.parametrize("url", ["127.0.0.1:6379", "redis://127.0.0.1:notaport/0", "redis://[::1/0"])
def test_a_bad_redis_url_never_reaches_the_app(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                               url: str) -> None:
    """The client was made outside any try: claim() and take() raised ValueError into the app."""
    monkeypatch.setenv(ENV_URL, url)
    done = []
    with claim("1") as held:
        done.append(1)
    assert done == [1] and held.registered is False
    assert take(timeout=0.1, poll=0.05) is None
    assert any("working on it untracked" in m for m in caplog.messages), caplog.messages
    assert any("could not take work" in m for m in caplog.messages), caplog.messages


def test_take_with_a_key_of_the_wrong_type_leaves_the_queue_as_it_was(r: redis.Redis, redis_port: int) -> None:
    """The take script popped the id, then SADD or HSET failed on a key of the wrong
    type: the id was in no queue and no claimed set, lost."""
    r.rpush("task_queue", "a", "b")
    r.set("issue:b", "a string, not a hash")
    assert take(timeout=0.1, redis=client(redis_port)) is None
    assert r.lrange("task_queue", 0, -1) == ["a", "b"] and not r.exists("processing_issues")
    r.delete("issue:b")
    r.rpush("processing_issues", "x")  # the claimed set is a list
    assert take(timeout=0.1, redis=client(redis_port)) is None
    assert r.lrange("task_queue", 0, -1) == ["a", "b"] and not r.exists("issue:b")
