"""Work claims against hostile or careless data, with a real Redis: field values no
worker should write, keys of the wrong type, scripts that must apply all or nothing,
claim times in the wrong unit or zone, configurations that would lose jobs, and a scan
that must never hold up anything else of the exporter."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from exporter.claims import Liveness, connect
from exporter.config import Config
from exporter.procfs import ProcessInfo, ProcReader

from .claims_util import claims_config, dead_pid, put_claim, scan, spec_of, watch_the_slow_job
from .helpers import free_port, samples, scrape, value, wait_for, wait_until

SVC = {"service_name": "worker"}


@pytest.fixture
def r(redis_port: int) -> redis.Redis:
    return redis.Redis(port=redis_port, decode_responses=True)


def judged(config: Config, liveness: Liveness | None = None) -> dict[str, tuple[str, str]]:
    """Each claim's (state, reason) from one scan (every orphan and every invalid kept)."""
    seen = scan(config, keep=1000, liveness=liveness)
    return {c.id_text: (c.state, c.reason) for c in seen.orphans + seen.invalid_examples}


# --- hostile field values ------------------------------------------------------------------------

HOSTILE_PIDS = ["9" * 5000, "9" * 4301, "²", "٣", "0x10", "-5", "1e3", " ", "4194304", "00000000000042"]


async def test_hostile_pids_are_invalid_and_never_fail_a_scrape_or_a_release(
        r: redis.Redis, redis_port: int, tmp_path: Path, exporter_for: Any, release_claims: Any) -> None:
    """A pid of 4,301 digits or more made int() raise: every scrape of every service
    answered 500 and release_claims raised."""
    now = time.time()
    put_claim(r, "ok", "w-dead", dead_pid(), now - 30)
    for i, pid in enumerate(HOSTILE_PIDS):
        put_claim(r, f"hostile-{i}", f"w-x{i}", pid, now - 20)
    config = claims_config(redis_port, tmp_path)
    client = await exporter_for(config)
    data = samples(await scrape(client))  # 200, or scrape() fails
    assert [value(data, "caretaker_claims", state=s, **SVC) for s in ("active", "orphaned", "invalid")] == [
        0, 1, len(HOSTILE_PIDS)]
    assert value(data, "caretaker_claims_scan_errors_total", reason="error", **SVC) == 0
    verdicts = judged(config)
    assert {verdicts[f"hostile-{i}"] for i in range(len(HOSTILE_PIDS))} == {("invalid", "bad_pid")}
    steps = await release_claims(config)
    assert next(s for s in steps.steps if "released" in s)["released"] == ["ok"]
    assert r.smembers("processing_issues") == {f"hostile-{i}" for i in range(len(HOSTILE_PIDS))}


class _Failing(ProcReader):
    """/proc as it is, except that reading one pid raises something no one expected."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def stat(self, pid: int) -> ProcessInfo | None:
        if pid == self.bad:
            raise RuntimeError("an unexpected failure judging this claim")
        return super().stat(pid)


def test_a_claim_that_cannot_be_judged_is_invalid_and_the_others_are_judged(r: redis.Redis, redis_port: int,
                                                                            tmp_path: Path, children: Any) -> None:
    other = children.start(["sleep", "60"])
    wait_for(lambda: ProcReader().stat(other.pid) is not None, 5, what="sleep to run")
    now = time.time() + 1  # after both processes started
    put_claim(r, "cursed", "w-1", os.getpid(), now)
    put_claim(r, "plain", "w-2", dead_pid(), now - 20)
    put_claim(r, "alive", "w-3", other.pid, now)
    verdicts = judged(claims_config(redis_port, tmp_path), Liveness(_Failing(os.getpid())))
    assert verdicts == {"cursed": ("invalid", "unreadable"), "plain": ("orphaned", "owner_dead")}


# --- keys of the wrong type -------------------------------------------------------------------------

async def test_an_item_of_the_wrong_type_is_invalid_and_the_scan_goes_on(r: redis.Redis, redis_port: int,
                                                                        tmp_path: Path, exporter_for: Any) -> None:
    """One item key holding a string made the whole pipeline raise: the scan failed on
    every scrape, and the series kept the last good view without a word."""
    now = time.time()
    for i in range(5):
        put_claim(r, f"dead-{i}", "w-dead", dead_pid(), now - 30)
    r.sadd("processing_issues", "legacy", "listed")
    r.set("issue:legacy", '{"json": "blob"}')  # an item stored as a string
    r.rpush("issue:listed", "x")
    config = claims_config(redis_port, tmp_path)
    client = await exporter_for(config)
    before = time.time()
    data = samples(await scrape(client))
    assert [value(data, "caretaker_claims", state=s, **SVC) for s in ("active", "orphaned", "invalid")] == [0, 5, 2]
    assert value(data, "caretaker_claims_scan_errors_total", reason="error", **SVC) == 0
    assert before <= value(data, "caretaker_claims_last_scan_timestamp_seconds", **SVC) <= time.time()
    verdicts = judged(config)
    assert verdicts["legacy"] == verdicts["listed"] == ("invalid", "wrong_type")


async def test_the_last_successful_scan_is_shown_and_kept_while_scans_fail(r: redis.Redis, redis_port: int,
                                                                           tmp_path: Path, exporter_for: Any) -> None:
    put_claim(r, "1", "w-dead", dead_pid(), time.time() - 30)
    client = await exporter_for(claims_config(redis_port, tmp_path))
    data = samples(await scrape(client))
    good = value(data, "caretaker_claims_last_scan_timestamp_seconds", **SVC)
    assert good > 0 and value(data, "caretaker_claims", state="orphaned", **SVC) == 1
    r.delete("processing_issues")
    r.rpush("processing_issues", "1")  # claimed_key of the wrong type: the scan itself fails
    for failures in (1, 2):
        data = samples(await scrape(client))
        assert value(data, "caretaker_claims_scan_errors_total", reason="error", **SVC) == failures
        assert value(data, "caretaker_claims_last_scan_timestamp_seconds", **SVC) == good
        assert value(data, "caretaker_claims", state="orphaned", **SVC) == 1  # the last view, with its time


async def test_no_successful_scan_yet_is_a_timestamp_of_zero(tmp_path: Path, exporter_for: Any) -> None:
    client = await exporter_for(claims_config(free_port(), tmp_path))  # nothing listens there
    data = samples(await scrape(client))
    assert value(data, "caretaker_claims_last_scan_timestamp_seconds", **SVC) == 0
    assert value(data, "caretaker_claims_scan_errors_total", reason="connection", **SVC) == 1


# --- all or nothing ---------------------------------------------------------------------------------

def release_now(config: Config) -> list[tuple[str, str]]:
    from receiver.claims import find_orphans, release

    spec = spec_of(config)
    client = connect(spec, config.base_dir)
    return [(c.id_text, o) for c, o in release(client, spec, find_orphans(client, spec, ProcReader()).orphans).outcomes]


async def test_a_queue_of_the_wrong_type_fails_the_release_and_changes_nothing(
        r: redis.Redis, redis_port: int, tmp_path: Path, release_claims: Any) -> None:
    """The script removed the claim, then RPUSH failed on a queue of another type: the
    job was in no set and no queue, lost."""
    from receiver.actions import RepairFailed

    put_claim(r, "17", "w-dead", dead_pid(), time.time() - 30)
    before = r.hgetall("issue:17")
    r.zadd("task_queue", {"other": 1})  # the app's queue is a sorted set: RPUSH cannot work
    config = claims_config(redis_port, tmp_path)
    assert release_now(config) == [("17", "queue_wrong_type")]
    assert r.smembers("processing_issues") == {"17"} and r.hgetall("issue:17") == before
    assert r.zrange("task_queue", 0, -1) == ["other"]
    with pytest.raises(RepairFailed, match=r"1 claims could not be released: .*not a list"):
        await release_claims(config)
    assert r.smembers("processing_issues") == {"17"} and r.hgetall("issue:17") == before


def test_an_item_that_changed_type_before_the_release_is_left_alone(r: redis.Redis, redis_port: int,
                                                                   tmp_path: Path) -> None:
    from receiver.claims import find_orphans, release

    put_claim(r, "17", "w-dead", dead_pid(), time.time() - 30)
    config = claims_config(redis_port, tmp_path)
    spec = spec_of(config)
    client = connect(spec, tmp_path)
    seen = find_orphans(client, spec, ProcReader())
    r.delete("issue:17")
    r.set("issue:17", "rewritten by the app as a string")
    assert [o for _, o in release(client, spec, seen.orphans).outcomes] == ["wrong_type"]
    assert r.smembers("processing_issues") == {"17"} and r.llen("task_queue") == 0


@pytest.mark.parametrize("change", ["pid", "host"])
def test_a_claim_whose_pid_or_host_changed_before_the_release_is_left_alone(
        r: redis.Redis, redis_port: int, tmp_path: Path, change: str) -> None:
    """Stable owner names (worker-1), judged by pid: worker-1 dies holding 7, its restart
    (same name, a new pid: this process) takes 7 up again before the release runs. The
    script re-checked only the owner and the claim time, and released it from under
    its live owner."""
    from receiver.claims import find_orphans, release

    put_claim(r, "7", "worker-1", dead_pid(), time.time() - 1, host="")
    config = claims_config(redis_port, tmp_path, heartbeat_key=None)  # judged by the pid alone
    spec = spec_of(config)
    client = connect(spec, tmp_path)
    seen = find_orphans(client, spec, ProcReader())
    assert [c.reason for c in seen.orphans] == ["owner_dead"]
    if change == "pid":
        r.hset("issue:7", "pid", str(os.getpid()))  # the new worker-1 resumes its own claim
    else:
        r.hset("issue:7", "host", "elsewhere")  # moved to another host, which may be beating for it
    before = r.hgetall("issue:7")
    assert [o for _, o in release(client, spec, seen.orphans).outcomes] == ["retaken"]
    assert r.hgetall("issue:7") == before and r.smembers("processing_issues") == {"7"}
    r.hset("issue:7", mapping={"pid": seen.orphans[0].pid.decode(), "host": ""})  # as it was seen
    assert [o for _, o in release(client, spec, seen.orphans).outcomes] == ["released"]


def test_a_claim_without_a_pid_or_a_host_field_is_still_released(r: redis.Redis, redis_port: int,
                                                                 tmp_path: Path) -> None:
    r.sadd("processing_issues", "remote", "local")
    r.hset("issue:remote", mapping={"processId": "w-gone", "startTime": "2026-01-01T00:00:00Z",
                                    "host": "elsewhere"})  # no pid: judged by its heartbeat
    r.hset("issue:local", mapping={"processId": "w-dead", "startTime": "2026-01-01T00:00:00Z",
                                   "pid": str(dead_pid())})  # no host: this host
    config = claims_config(redis_port, tmp_path)
    assert sorted(release_now(config)) == [("local", "released"), ("remote", "released")]


# --- claim times in the wrong unit or zone ----------------------------------------------------------

@pytest.mark.parametrize(("claim_time_format", "written"), [
    ("epoch_ms", lambda t: f"{t:.0f}"),           # configured in ms, written in seconds: 1970
    ("epoch_seconds", lambda t: f"{t * 1000:.0f}"),  # configured in seconds, written in ms: year 58,000
    ("iso8601", lambda t: "1999-12-31T23:59:59Z"),
    ("iso8601", lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t + 3600))),  # an hour ahead
])
def test_an_implausible_claim_time_is_invalid_never_orphaned(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                              claim_time_format: str, written: Any) -> None:
    """A live worker's claim (its heartbeat fresh) written in seconds where ms were
    configured looked 56 years old: orphaned by max_age, and released."""
    put_claim(r, "live", "w-me", os.getpid(), written(time.time() - 5), heartbeat_ttl=60)
    config = claims_config(redis_port, tmp_path, claim_time_format=claim_time_format, max_age="6h")
    assert judged(config) == {"live": ("invalid", "bad_claim_time")}
    assert release_now(config) == []
    assert r.smembers("processing_issues") == {"live"}


@pytest.fixture
def zone(monkeypatch: pytest.MonkeyPatch) -> Any:
    """zone("EST5") sets this process's local time zone (POSIX TZ, no tzdata needed)."""
    def set_zone(tz: str) -> None:
        monkeypatch.setenv("TZ", tz)
        time.tzset()
    yield set_zone
    monkeypatch.undo()
    time.tzset()


def naive(when: float, utc: bool) -> str:
    """What Python writes without an offset: datetime.now().isoformat() (local time) or
    datetime.utcnow().isoformat() (UTC)."""
    from datetime import UTC, datetime

    moment = datetime.fromtimestamp(when, UTC) if utc else datetime.fromtimestamp(when)
    return moment.replace(tzinfo=None).isoformat()


@pytest.mark.parametrize("tz", ["EST5", "CET-2"])  # UTC-5 (west), UTC+2 (east)
@pytest.mark.parametrize("writer", ["local", "utc"])
def test_a_naive_claim_time_never_makes_live_work_look_orphaned(r: redis.Redis, redis_port: int, tmp_path: Path,
                                                                 zone: Any, tz: str, writer: str) -> None:
    """A worker on a host in UTC-5 writing datetime.now().isoformat() had its claim read as
    UTC, five hours early: its own live process looked like a reused pid, and with max_age
    3h its claim of two hours ago looked seven hours old."""
    zone(tz)
    now = time.time()
    put_claim(r, "live", "w-me", os.getpid(), naive(now, utc=writer == "utc"))  # this process runs
    put_claim(r, "young", "w-gone", None, naive(now - 7200, utc=writer == "utc"), host="elsewhere")
    # older than max_age plus the zone's offset: past max_age whichever reading is taken
    put_claim(r, "old", "w-gone", None, naive(now - 9 * 3600, utc=writer == "utc"), host="elsewhere")
    by_pid = claims_config(redis_port, tmp_path, heartbeat_key=None, max_age="3h")  # no heartbeat to save it
    assert judged(by_pid) == {"old": ("orphaned", "max_age")}  # "live" and "young" are active
    exact = claims_config(redis_port, tmp_path, heartbeat_key=None, max_age="3h", claim_time_zone=writer)
    seen = scan(exact, keep=10)
    assert [(c.id_text, c.reason) for c in seen.orphans] == [("old", "max_age")]
    assert seen.orphans[0].claimed_at == pytest.approx(now - 9 * 3600, abs=1)


# --- configurations that would lose jobs ----------------------------------------------------------

@pytest.mark.parametrize(("claims", "problem"), [
    ({"release": {"push_to": "queue:{id}"}},
     "services.w.claims.release.push_to: 'queue:{id}' has a brace; it is one key, written as it is (no "
     "placeholders)"),
    ({"claimed_key": "busy:{owner}"}, "services.w.claims.claimed_key: 'busy:{owner}' has a brace"),
    ({"release": {"push_to": None, "set_fields": {}}},
     "services.w.claims.release: give push_to or set_fields: a release that only removes the id from "
     "claimed_key drops the job"),
    ({"release": {"push_to": None, "set_fields": {}, "delete_fields": []}}, "services.w.claims.release: give push_to"),
])
def test_a_release_that_would_drop_the_job_is_refused_naming_its_place(claims: dict[str, Any], problem: str) -> None:
    """push_to: 'queue:{id}' pushed to a key literally named queue:{id}; a release with
    neither push_to nor set_fields took the id out of the claimed set and left it
    nowhere: both were accepted."""
    from exporter.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"services": {"w": {"match": {"comm": "x"}, "claims": claims,
                                         "remediation": {"allow": ["release_claims"]}}}})
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("release", [{"push_to": None, "set_fields": {"status": "queued"}},
                                     {"push_to": "jobs:pending", "set_fields": {}}])
def test_a_release_that_pushes_or_marks_the_item_is_accepted(release: dict[str, Any], tmp_path: Path) -> None:
    """A release without push_to is fine when the app finds queued items by their status."""
    assert spec_of(claims_config(6379, tmp_path, release=release)).release.push_to == release["push_to"]


# --- a scan never holds up anything else of the exporter ------------------------------------------------

async def test_scans_of_a_frozen_redis_never_delay_heartbeats_nor_the_process_scan(
        exporter_for: Any, redis_server: Any, tmp_path: Path) -> None:
    """Claims scans ran in the default executor, shared with the process scan and the
    heartbeat endpoint: with as many services as its threads watching a frozen Redis, a
    heartbeat POST was answered after 4.2 s and the process scan timed out."""
    import signal

    from exporter.config import parse_config

    port = free_port()
    proc = await asyncio.to_thread(redis_server, port)
    put_claim(redis.Redis(port=port), "1", "w", dead_pid(), time.time() - 5)
    services: dict[str, Any] = {f"w{i}": {"match": {"comm": "^nothing-matches$"}, "processes": {"min": 0},
                                          "claims": {"port": port}}
                                for i in range(min(32, (os.cpu_count() or 1) + 4))}  # the default executor's size
    services["app"] = {"match": {"comm": "^nothing-matches$"}, "processes": {"min": 0},
                       "heartbeats": [{"name": "hb", "timeout": 30}]}
    config = parse_config({"exporter": {"state_file": "s.json"}, "services": services}, base_dir=tmp_path)
    client = await exporter_for(config)
    await scrape(client, timeout="1")  # connections made
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        answered = []
        for _ in range(3):  # scrapes every second, as the shipped prometheus.yml does
            data = samples(await scrape(client, timeout="1"))
            started = time.monotonic()
            assert (await client.post(f"/heartbeat/hb?pid={os.getpid()}")).status == 200
            answered.append(time.monotonic() - started)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert max(answered) < 1.0, f"heartbeat POSTs answered after {answered}"
    assert value(data, "caretaker_exporter_errors_total", reason="scan_timeout") == 0


def test_a_pid_that_started_after_the_listing_of_proc_is_still_looked_up(children: Any) -> None:
    """A scan lists the running pids once, and looks up only those (a dead owner's pid costs
    no failed open): a process that started since, owning a claim made since, is alive."""
    live = Liveness()
    assert live.owner(dead_pid(), time.time() - 60) == "dead"  # the listing is made here
    late = children.start(["sleep", "60"])
    wait_for(lambda: ProcReader().stat(late.pid) is not None, 5, what="sleep to run")
    assert live.owner(late.pid, time.time()) == "alive"  # a claim made after the listing: looked up
    assert Liveness().owner(late.pid, time.time() - 60) == "reused"
    old = Liveness()
    assert old.owner(os.getpid(), time.time()) == "alive"  # listed
    assert old.owner(late.pid, time.time() - 60) == "reused"  # listed too: looked up


# --- tests that assert what their names say ------------------------------------------------------------

async def test_a_slow_worker_on_another_host_is_kept_by_its_heartbeat(r: redis.Redis, redis_port: int,
                                                                     tmp_path: Path, children: Any,
                                                                     release_claims: Any) -> None:
    """tests/test_claims_release.py's slow worker is local and alive, so its heartbeat is
    never asked. Here its host field names another host: only its heartbeat keeps it,
    through a job of more than eight TTLs; stopped, it is orphaned by that alone."""
    import signal

    from .claims_util import start_worker

    ttl = 0.6
    r.hset("issue:slow", "seconds", "6")
    r.lpush("task_queue", "slow")
    worker = start_worker(children, redis_port, "remote-slow", "--ttl", str(ttl), "--host", "elsewhere",
                          log=tmp_path / "slow.log")
    await wait_until(lambda: r.get("started:slow") == "1", 15, what="the worker to start its job")
    assert r.hget("issue:slow", "host") == "elsewhere"
    config = claims_config(redis_port, tmp_path)
    looks = await watch_the_slow_job(r, config, release_claims, seconds=4.0)
    assert looks[-1] - looks[0] > 5 * ttl, "looked at it throughout, not only at its start"
    os.kill(worker.pid, signal.SIGSTOP)  # alive here, but remote: only the heartbeat speaks for it
    owner = r.hget("issue:slow", "processId")
    await wait_until(lambda: not r.exists(f"heartbeat:{owner}"), 5, what="the heartbeat to lapse")
    assert judged(config) == {"slow": ("orphaned", "heartbeat_absent")}
