"""caretaker_client.claims where things go wrong, against a real Redis: a queue of the
wrong type, a Redis that stops answering mid-way, threads of one process working on the
same item, many clients, bad URLs. The app's work is never hurt and no job is lost."""

from __future__ import annotations

import pytest
import redis

from caretaker_client.claims import claim


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
