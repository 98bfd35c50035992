"""caretaker_client.claims where things go wrong, against a real Redis: a queue of the
wrong type, a Redis that stops answering mid-way, threads of one process working on the
same item, many clients, bad URLs. The app's work is never hurt and no job is lost."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import caretaker_client.claims as claims_module
from caretaker_client.claims import ENV_URL, claim, take

from .helpers import Children, free_port, port_open, require_binary, wait_for


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


ONE_KEEPER = """\
import gc, json, sys, threading, time, weakref
import redis
import caretaker_client.claims as claims
from caretaker_client.claims import claim

claims.KEEPER_IDLE_SECONDS = 0.2
port = int(sys.argv[1])
r = redis.Redis(port=port)

def keepers():
    return sum(1 for t in threading.enumerate() if t.name == "caretaker-claims-heartbeat")

made, held, threads, alive = [], [], [], []
for i in range(20):  # an app that makes a client per job
    c = redis.Redis(port=port, socket_timeout=2)
    made.append(weakref.ref(c))
    held.append(claim(str(i), redis=c, heartbeat_ttl=0.6).__enter__())
    threads.append(keepers())
owner = held[0].owner
for _ in range(6):  # 1.2 s: two TTLs, refreshed through the 20 clients by the one thread
    alive.append(bool(r.exists(f"heartbeat:{owner}")))
    time.sleep(0.2)
for h in held:
    h.__exit__(None, None, None)
del h, held, c
deadline = time.monotonic() + 5
while keepers() and time.monotonic() < deadline:
    time.sleep(0.05)
ended = keepers() == 0
gc.collect()
kept = sum(1 for ref in made if ref() is not None)
with claim("again", redis=redis.Redis(port=port), heartbeat_ttl=0.6) as again:  # started again on demand
    restarted = keepers()
    time.sleep(1.0)
    fresh = bool(r.exists(f"heartbeat:{again.owner}"))
print(json.dumps({"threads": threads, "alive": alive, "ended": ended, "clients_kept": kept,
                  "restarted": restarted, "fresh": fresh}))
"""


def test_one_heartbeat_thread_per_process_gone_when_idle(redis_port: int) -> None:
    """A thread per client object, kept for ever: an app making a client per job had 20
    threads after 20 jobs, each holding its client. (In a process of its own: this test
    process may have retries pending from other tests, which keep its thread busy.)"""
    result = subprocess.run([sys.executable, "-c", ONE_KEEPER, str(redis_port)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["threads"] == [1] * 20
    assert all(seen["alive"]), "the heartbeat lapsed while claims were open"
    assert seen["ended"], "the idle heartbeat thread did not end"
    assert seen["clients_kept"] == 0, "a client outlived its claims"
    assert seen["restarted"] == 1 and seen["fresh"]


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


# --- claims Redis holds that the app does not know about ----------------------------------------------

def frozen_redis(proc: subprocess.Popen[bytes]) -> Any:
    """with frozen_redis(proc): Redis is SIGSTOPped inside the block, and continued after it."""
    import contextlib

    @contextlib.contextmanager
    def frozen() -> Iterator[None]:
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    return frozen()


def test_a_finish_that_failed_is_retried_until_redis_answers(children: Children, tmp_path: Path) -> None:
    """Marking a job done failed while Redis restarted, and was never tried again: the
    claim stayed active for as long as the worker lived (its pid runs)."""
    port = free_port()
    argv = [require_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "yes", "--dir", str(tmp_path)]
    proc = children.start(argv)
    wait_for(lambda: port_open(port), 10, what="redis")
    r = redis.Redis(port=port, decode_responses=True)
    held = claim("A", redis=redis.Redis(port=port, socket_timeout=1), heartbeat_ttl=1.0).__enter__()
    r.shutdown()  # Redis restarts while the job ends (appendonly: the claim survives)
    proc.wait(10)
    held.__exit__(None, None, None)  # the work is done; marking it done fails
    assert held.result == "error"
    children.start(argv)
    wait_for(lambda: port_open(port), 10, what="redis again")
    r = redis.Redis(port=port, decode_responses=True)
    assert r.sismember("processing_issues", "A")  # the claim is still there, for the retry to end it
    wait_for(lambda: not r.sismember("processing_issues", "A"), 15, what="the retry to complete the claim")
    assert r.hget("issue:A", "status") == "done"


def test_a_take_whose_answer_was_lost_gives_the_job_back(redis_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The take script ran but its answer timed out: take() returned None while Redis held
    the job claimed by this live process, for ever."""
    port = free_port()
    proc = redis_server(port)
    r = redis.Redis(port=port, decode_responses=True)
    r.lpush("task_queue", "job")
    app = redis.Redis(port=port, socket_timeout=0.5)
    app.ping()
    with frozen_redis(proc):
        assert take(timeout=0.1, redis=app) is None  # the script is sent; the answer times out
    wait_for(lambda: r.lrange("task_queue", 0, -1) == ["job"], 15, what="the job back in the queue")
    assert not r.smembers("processing_issues")
    assert r.hget("issue:job", "status") == "queued" and r.hget("issue:job", "processId") is None
    assert take(timeout=1, redis=app) is not None  # and a worker takes it again


def test_a_claim_whose_registration_answer_was_lost_is_still_ended(redis_server: Any) -> None:
    """The registration applied but its answer timed out: the app worked untracked and
    nothing ever ended the claim Redis held."""
    port = free_port()
    proc = redis_server(port)
    r = redis.Redis(port=port, decode_responses=True)
    app = redis.Redis(port=port, socket_timeout=0.5)
    app.ping()
    done = []
    with frozen_redis(proc):
        held = claim("B", redis=app).__enter__()  # times out, then Redis applies it
    assert held.registered is False
    done.append("B")  # the app's work goes on
    held.__exit__(None, None, None)
    wait_for(lambda: r.hget("issue:B", "status") == "done", 15, what="the claim to be completed")
    assert not r.smembers("processing_issues") and done == ["B"]


def test_what_was_never_sent_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens: no claim can have been made, nothing is handed to the background."""
    monkeypatch.setenv(ENV_URL, f"redis://127.0.0.1:{free_port()}/0")
    before = claims_module.pending()  # what earlier tests' Redis servers, now gone, left to retry
    started = time.monotonic()
    with claim("1") as held:
        pass
    assert take(timeout=0.1) is None
    assert held.registered is False and held.unsure is False and held.result is None
    assert time.monotonic() - started < 2
    assert claims_module.pending() == before


def test_entering_a_claim_against_a_frozen_redis_returns_within_the_command_timeout(
        redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_claims_client.py's frozen-Redis test measures the app's own work, which
    nothing blocks; where the app waits is entering the claim (its registration)."""
    port = free_port()
    proc = redis_server(port)
    monkeypatch.setenv(ENV_URL, f"redis://127.0.0.1:{port}/0")  # the default client: 2 s per command
    redis.Redis(port=port).ping()
    done = []
    with frozen_redis(proc):
        started = time.monotonic()
        with claim("1") as held:
            entered = time.monotonic() - started
            done.append(1)
        left = time.monotonic() - started - entered
    assert done == [1] and held.registered is False
    assert entered < claims_module.COMMAND_TIMEOUT + 1.0, f"entering took {entered:.1f}s"
    assert entered >= claims_module.COMMAND_TIMEOUT * 0.9  # it did wait for Redis: the bound was met, not skipped
    assert left < 0.5, f"leaving took {left:.1f}s"  # the end of an unsure claim is told in the background


def test_a_redis_that_does_not_answer_holds_up_only_its_own_retries(redis_server: Any) -> None:
    """Every due retry was tried in turn, each costing a command timeout against a Redis
    that does not answer: five pending for it held another Redis's retry for five
    timeouts. Once one of a client's retries fails, the others of that client wait."""
    frozen_port, live_port = free_port(), free_port()
    frozen_proc = redis_server(frozen_port)
    redis_server(live_port)
    once = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5, "retry": Retry(NoBackoff(), 0)}  # as the client's own
    frozen_client, live_client = redis.Redis(port=frozen_port, **once), redis.Redis(port=live_port, **once)
    frozen_client.ping()
    tried: list[str] = []

    def ping_frozen(i: int) -> str:
        tried.append(f"frozen-{i}")
        frozen_client.ping()
        return "answered"

    def tell_live() -> str:
        tried.append("live")
        live_client.set("told", "1")
        return "told"

    keeper = claims_module._Keeper()  # a keeper of the test's own: no other test's retries in its rounds
    with frozen_redis(frozen_proc):
        for i in range(5):
            keeper.retry(f"frozen {i}", frozen_client, functools.partial(ping_frozen, i))
        keeper.retry("live", live_client, tell_live)
        wait_for(lambda: live_client.get("told") == b"1", 10, what="the live Redis's retry")
        assert tried[:2] == ["frozen-0", "live"], tried  # one timeout for the frozen Redis, then the live one
        assert tried.count("live") == 1
    wait_for(lambda: keeper.pending() == 0, 15, what="the frozen Redis's retries once it answers")
    assert {f"frozen-{i}" for i in range(5)} <= set(tried), tried  # and each was told once it answered
