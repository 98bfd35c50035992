"""caretaker_client.claims, against a real Redis: claims in the layout caretaker watches
by default, a heartbeat kept fresh in the background, complete / release / fail on exit,
and never an error raised into the app's work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from caretaker_client.claims import ENV_URL, Claim, Layout, claim, owner_id, take
from exporter.claims import Liveness, connect, scan_claims

from .claims_util import claims_config
from .helpers import free_port


@pytest.fixture
def r(redis_port: int) -> redis.Redis:
    return redis.Redis(port=redis_port, decode_responses=True)


def client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=2)


def test_a_claim_is_registered_as_caretaker_reads_it_and_completed_on_exit(r: redis.Redis, redis_port: int,
                                                                           tmp_path: Path) -> None:
    spec = claims_config(redis_port, tmp_path).services["worker"].claims
    assert spec is not None
    with claim("42", redis=client(redis_port), fields={"taskType": "summarize"}) as held:
        item = r.hgetall("issue:42")
        assert r.smembers("processing_issues") == {"42"}
        assert item["processId"] == held.owner == owner_id()
        assert (item["status"], item["pid"], item["taskType"]) == ("processing", str(os.getpid()), "summarize")
        assert item["startTime"].endswith("Z")
        assert 0 < r.pttl(f"heartbeat:{held.owner}") <= 1800 * 1000
        seen = scan_claims(connect(spec, tmp_path), spec, Liveness(), time.monotonic() + 5)
        assert seen.counts() == {"active": 1, "orphaned": 0, "invalid": 0}
    assert held.result == "done"
    assert r.smembers("processing_issues") == set()
    assert r.hget("issue:42", "status") == "done"
    assert r.llen("task_queue") == 0


def test_the_heartbeat_is_kept_fresh_in_the_background(r: redis.Redis, redis_port: int) -> None:
    same = client(redis_port)
    for item in ("7", "8"):  # the second finds the heartbeat thread idle, and wakes it
        with claim(item, redis=same, heartbeat_ttl=0.6) as held:
            key = f"heartbeat:{held.owner}"
            for _ in range(12):  # 2.4s: four TTLs
                assert r.exists(key), f"the heartbeat lapsed while {item} was held"
                time.sleep(0.2)
        time.sleep(0.8)
        assert not r.exists(key), "no refresh once the claim is done"


def test_an_exception_releases_the_item_back_to_the_queue_and_goes_on(r: redis.Redis, redis_port: int) -> None:
    r.lpush("task_queue", "waiting")
    with pytest.raises(RuntimeError, match="boom"), claim("9", redis=client(redis_port)) as held:
        raise RuntimeError("boom")
    assert held.result == "released"
    assert r.smembers("processing_issues") == set()
    assert r.hgetall("issue:9") == {"status": "queued"}  # the claim fields are gone
    assert r.lrange("task_queue", 0, -1) == ["waiting", "9"]  # right end: taken next


def test_on_error_fail_takes_the_item_out_without_queueing_it(r: redis.Redis, redis_port: int) -> None:
    with pytest.raises(ValueError), claim("9", redis=client(redis_port), on_error="fail") as held:
        raise ValueError("poison")
    assert held.result == "failed"
    assert r.smembers("processing_issues") == set()
    assert r.hget("issue:9", "status") == "failed"
    assert r.llen("task_queue") == 0


def test_a_stop_always_releases(r: redis.Redis, redis_port: int) -> None:
    with pytest.raises(KeyboardInterrupt), claim("3", redis=client(redis_port), on_error="fail"):
        raise KeyboardInterrupt
    assert r.lrange("task_queue", 0, -1) == ["3"]


def test_a_claim_taken_over_meanwhile_is_left_to_its_new_owner(r: redis.Redis, redis_port: int) -> None:
    with claim("5", redis=client(redis_port)) as held:
        r.hset("issue:5", mapping={"processId": "someone-else", "startTime": "2026-12-02T13:00:00.000Z"})
    assert held.result == "lost"
    assert r.smembers("processing_issues") == {"5"}
    assert r.hgetall("issue:5")["processId"] == "someone-else"
    assert r.hget("issue:5", "status") == "processing"


def test_take_pops_and_claims_in_one_step(r: redis.Redis, redis_port: int) -> None:
    r.lpush("task_queue", "1", "2")
    job = take(timeout=1, redis=client(redis_port), heartbeat_ttl=5)
    assert job is not None and job.item_id == "1"  # the right end: the oldest
    assert r.smembers("processing_issues") == {"1"}
    assert r.hget("issue:1", "processId") == job.owner
    assert r.exists(f"heartbeat:{job.owner}")
    assert r.lrange("task_queue", 0, -1) == ["2"]
    with job:
        pass
    assert job.result == "done"
    assert take(timeout=1, redis=client(redis_port)) is not None
    started = time.monotonic()
    assert take(timeout=0.5, poll=0.1, redis=client(redis_port)) is None
    assert time.monotonic() - started < 1.5


def test_other_layouts(r: redis.Redis, redis_port: int) -> None:
    layout = Layout(claimed_key="busy", item_key="job:{id}", owner_field="worker", heartbeat_key="alive:{owner}:{id}",
                    queue_key="jobs")
    r.lpush("jobs", "a%1")  # a % in an id: plain text, not a pattern
    job = take(timeout=1, redis=client(redis_port), layout=layout)
    assert job is not None and job.item_id == "a%1"
    assert r.hget("job:a%1", "worker") == job.owner
    assert r.exists(f"alive:{job.owner}:a%1")
    with pytest.raises(OSError), job:
        raise OSError("disk")
    assert r.lrange("jobs", 0, -1) == ["a%1"]


def test_redis_errors_never_reach_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_URL, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    done = []
    started = time.monotonic()
    with claim("1") as held:
        done.append(1)
    assert done == [1] and held.registered is False and held.result is None
    assert take(timeout=0.2) is None
    assert time.monotonic() - started < 2  # refused at once, no retries


def test_a_frozen_redis_never_stops_the_work(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    proc = redis_server(port)
    monkeypatch.setenv(ENV_URL, f"redis://127.0.0.1:{port}/0")  # the default client: 2s per command, no retry
    with claim("1", heartbeat_ttl=0.3) as held:
        os.kill(proc.pid, signal.SIGSTOP)  # the heartbeat thread is now stuck in Redis
        try:
            started = time.monotonic()
            total = sum(range(200_000))  # the app's own work goes on
            assert time.monotonic() - started < 0.5 and total
            time.sleep(0.5)
        finally:
            finished = time.monotonic()
    ended = time.monotonic() - finished
    os.kill(proc.pid, signal.SIGCONT)
    assert held.result == "error"  # completing timed out, logged
    assert ended < 4, f"ending the claim took {ended:.1f}s"


def test_each_process_has_its_own_owner(tmp_path: Path) -> None:
    child = subprocess.run([sys.executable, "-c", "from caretaker_client.claims import owner_id; print(owner_id())"],
                           capture_output=True, text=True, timeout=30, check=True)
    assert child.stdout.strip() != owner_id()
    assert owner_id().split("-")[-2] == str(os.getpid())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new owner, whatever the parent had
        os.write(write, owner_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 200).decode().split("-")[-2] == str(pid)
    os.close(read)
    os.close(write)


def test_the_client_needs_nothing_of_caretaker_but_itself(redis_port: int, tmp_path: Path) -> None:
    code = ("import sys; sys.modules['exporter'] = None; sys.modules['receiver'] = None\n"
            "from caretaker_client.claims import claim\n"
            "with claim('1') as held: pass\n"
            "print(held.result)")
    env = {**os.environ, "CARETAKER_CLAIMS_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


def test_a_heartbeat_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="heartbeat_ttl"):
        Claim("1", redis=client(free_port()), heartbeat_ttl=0)
