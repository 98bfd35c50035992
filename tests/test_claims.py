"""Work claims: the ``claims:`` config, the orphan rule, the scan (a real Redis), and the
exporter's series."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from exporter.claims import ClaimsScanError, Liveness, connect, parse_claim_time, scan_claims
from exporter.config import ConfigError, parse_config
from exporter.procfs import ProcReader

from .claims_util import claims_config, dead_pid, iso, put_claim
from .helpers import BTIME, CLK_TCK, PAGE, FakeProc, free_port, samples, scrape, value

# --- config --------------------------------------------------------------------------------


def test_the_issues_layout_is_the_default_and_needs_only_the_port(tmp_path: Path) -> None:
    spec = claims_config(6379, tmp_path).services["worker"].claims
    assert spec is not None
    assert (spec.claimed_key, spec.claimed_type, spec.item_key, spec.heartbeat_key) == (
        "processing_issues", "set", "issue:{id}", "heartbeat:{owner}")
    assert (spec.owner_field, spec.pid_field, spec.host_field, spec.claim_time_field, spec.claim_time_format) == (
        "processId", "pid", "host", "startTime", "iso8601")
    assert (spec.release.push_to, spec.release.push_end, spec.release.set_fields) == (
        "task_queue", "right", {"status": "queued"})
    assert spec.released_fields == ("processId", "startTime", "pid", "host")


@pytest.mark.parametrize(("claims", "problem"), [
    ({"item_key": "issue:{ident}"}, "services.w.claims.item_key: unknown placeholder {ident} in 'issue:{ident}'; "
                                    "it may use {id}"),
    ({"item_key": "issue"}, "services.w.claims.item_key: 'issue' must contain {id} (one key per item)"),
    ({"heartbeat_key": "hb:{owner"}, "services.w.claims.heartbeat_key: unbalanced brace in 'hb:{owner'"),
    ({"heartbeat_key": "hb:{pid}"}, "services.w.claims.heartbeat_key: unknown placeholder {pid}"),
    ({"heartbeat_key": None, "pid_field": None}, "services.w.claims: give heartbeat_key, pid_field or max_age"),
    ({"release": {"push_to": "processing_issues"}}, "services.w.claims.release.push_to: 'processing_issues' is "
                                                    "claimed_key"),
    ({"pid_field": "processId"}, "services.w.claims: owner_field, pid_field, host_field and claim_time_field must "
                                 "be different"),
    ({"claim_time_format": "rfc2822"}, "services.w.claims.claim_time_format: Input should be 'iso8601'"),
    ({"claimed_type": "list"}, "services.w.claims.claimed_type: Input should be 'set' or 'zset'"),
    ({"release": {"max_per_repair": 0}}, "services.w.claims.release.max_per_repair: Input should be greater than"),
    ({"keys": "*"}, "services.w.claims.keys: unknown key"),
])
def test_claims_config_errors_name_their_place(claims: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"services": {"w": {"match": {"comm": "x"}, "claims": claims}}})
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_release_claims_needs_a_claims_block() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"services": {"w": {"match": {"comm": "x"}, "remediation": {"allow": ["release_claims"]}}}})
    assert err.value.problems == ["services.w: remediation.allow has 'release_claims' but the service has no "
                                  "claims block"]


def test_claims_password_comes_from_a_secret_never_inline() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"services": {"w": {"match": {"comm": "x"}, "claims": {"password": "hunter2"}}}})
    assert any(p.startswith("services.w.claims.password") for p in err.value.problems)


@pytest.mark.parametrize(("raw", "fmt", "expected"), [
    (b"2026-12-02T13:02:04.123Z", "iso8601", 1796216524.123),
    (b"2026-12-02T14:02:04.123+01:00", "iso8601", 1796216524.123),
    (b"2026-12-02T13:02:04", "iso8601", 1796216524.0),  # no offset: UTC
    (b"1796216524", "epoch_seconds", 1796216524.0),
    (b"1796216524123", "epoch_ms", 1796216524.123),
    (b"yesterday", "iso8601", None), (b"nan", "epoch_seconds", None), (b"-5", "epoch_seconds", None),
    (b"\xff", "iso8601", None), (None, "iso8601", None),
])
def test_claim_times(raw: bytes | None, fmt: str, expected: float | None) -> None:
    got = parse_claim_time(raw, fmt)
    assert got == pytest.approx(expected) if expected is not None else got is None


# --- the orphan rule, against a real Redis and a fake /proc ----------------------------------

CLAIMED = BTIME + 100.0
"""Claim time of the cases: 100 s after the fake machine booted."""
BEFORE, AFTER = 1000, 20000
"""start_ticks of a process started 90 s before the claim, and 100 s after it."""


def _live(fake_proc: FakeProc) -> Liveness:
    return Liveness(ProcReader(fake_proc.root, CLK_TCK, PAGE), host="here")


# (id, claim fields, heartbeat alive, pid's start ticks or None for no process, state, reason)
RULE_CASES: list[tuple[str, dict[str, str], bool, int | None, str, str]] = [
    ("beating-owner-gone", {}, True, None, "active", "heartbeat"),
    ("silent-owner-runs", {}, False, BEFORE, "active", "owner_alive"),
    ("silent-owner-gone", {}, False, None, "orphaned", "owner_dead"),
    ("silent-pid-reused", {}, False, AFTER, "orphaned", "pid_reused"),
    ("started-within-a-second", {}, False, int(100.5 * CLK_TCK), "active", "owner_alive"),
    ("our-host-by-name", {"host": "here"}, False, None, "orphaned", "owner_dead"),
    ("remote-silent", {"host": "elsewhere"}, False, BEFORE, "orphaned", "heartbeat_absent"),
    ("remote-beating", {"host": "elsewhere"}, True, None, "active", "heartbeat"),
    ("no-owner", {"processId": ""}, False, None, "invalid", "no_owner"),
    ("bad-time", {"startTime": "soon"}, False, None, "invalid", "bad_claim_time"),
    ("bad-pid-silent", {"pid": "abc"}, False, None, "invalid", "bad_pid"),
    ("pid-one-silent", {"pid": "1"}, False, None, "invalid", "bad_pid"),
    ("bad-pid-beating", {"pid": "abc"}, True, None, "active", "heartbeat"),
    ("bad-pid-remote", {"pid": "abc", "host": "elsewhere"}, False, None, "orphaned", "heartbeat_absent"),
]


def test_each_claim_is_judged_by_the_rule(redis_port: int, fake_proc: FakeProc, tmp_path: Path) -> None:
    r = redis.Redis(port=redis_port)
    for pid, (item, fields, beating, ticks, _, _) in enumerate(RULE_CASES, start=5000):
        if ticks is not None:
            fake_proc.add(pid, start_ticks=ticks)
        put_claim(r, item, owner=f"w-{item}", pid=pid, claimed_at=CLAIMED, heartbeat_ttl=60 if beating else None)
        if fields:
            r.hset(f"issue:{item}", mapping=fields)  # type: ignore[arg-type]
    r.sadd("processing_issues", "no-item")  # an id whose hash is gone
    spec = claims_config(redis_port, tmp_path).services["worker"].claims
    assert spec is not None
    seen = scan_claims(connect(spec, tmp_path), spec, _live(fake_proc), time.monotonic() + 5, keep=100)
    judged = {c.id_text: (c.state, c.reason) for c in seen.orphans + seen.invalid_examples}
    for item, _, _, _, state, reason in RULE_CASES:
        if state != "active":
            assert judged[item] == (state, reason), item
    assert judged["no-item"] == ("invalid", "no_item")
    expected = {s: sum(1 for case in RULE_CASES if case[4] == s) for s in ("active", "orphaned", "invalid")}
    expected["invalid"] += 1
    assert seen.counts() == expected
    assert seen.oldest_orphan == pytest.approx(CLAIMED)


def test_max_age_orphans_a_claim_whatever_its_owner_says(redis_port: int, fake_proc: FakeProc,
                                                               tmp_path: Path) -> None:
    r = redis.Redis(port=redis_port)
    fake_proc.add(4242, start_ticks=BEFORE)
    now = time.time()
    put_claim(r, "old", "w-1", 4242, now - 7200, heartbeat_ttl=60)  # 4242: a process of the fake /proc
    put_claim(r, "young", "w-1", 4242, now - 60, heartbeat_ttl=60)
    spec = claims_config(redis_port, tmp_path, max_age="1h").services["worker"].claims
    assert spec is not None
    seen = scan_claims(connect(spec, tmp_path), spec, _live(fake_proc), time.monotonic() + 5, keep=10)
    assert [(c.id_text, c.reason, c.heartbeat_key) for c in seen.orphans] == [("old", "max_age", None)]
    assert seen.active == 1


@pytest.mark.parametrize(("options", "written"), [
    ({"claimed_type": "zset", "claim_time_format": "epoch_ms"}, lambda t: str(int(t * 1000))),
    ({"claim_time_format": "epoch_seconds", "pid_field": None, "host_field": None}, lambda t: f"{t:.3f}"),
])
def test_other_layouts(redis_port: int, fake_proc: FakeProc, tmp_path: Path, options: dict[str, Any],
                             written: Any) -> None:
    r = redis.Redis(port=redis_port)
    spec = claims_config(redis_port, tmp_path, claimed_key="busy", item_key="job:{id}:meta",
                         heartbeat_key="alive:{owner}:{id}", owner_field="worker", claim_time_field="at",
                         **options).services["worker"].claims
    assert spec is not None
    now = time.time()
    for item, beating in (("a", True), ("b", False)):
        if spec.claimed_type == "zset":
            r.zadd("busy", {item: now})
        else:
            r.sadd("busy", item)
        r.hset(f"job:{item}:meta", mapping={"worker": "w9", "at": written(now - 30), "pid": str(dead_pid())})
        if beating:
            r.set(f"alive:w9:{item}", "1", ex=60)
    seen = scan_claims(connect(spec, tmp_path), spec, _live(fake_proc), time.monotonic() + 5, keep=10)
    (orphan,) = seen.orphans
    assert orphan.id_text == "b"
    assert orphan.reason == ("heartbeat_absent" if spec.pid_field is None else "owner_dead")
    assert orphan.heartbeat_key == b"alive:w9:b"
    assert orphan.claimed_at == pytest.approx(now - 30, abs=0.01)
    assert seen.active == 1


def test_the_scan_uses_sscan_and_pipelines_never_keys(redis_port: int, fake_proc: FakeProc,
                                                             tmp_path: Path) -> None:
    r = redis.Redis(port=redis_port)
    dead = dead_pid()
    for i in range(1200):
        put_claim(r, str(i), f"w-{i % 7}", dead, CLAIMED, heartbeat_ttl=60 if i % 7 < 3 else None)
    spec = claims_config(redis_port, tmp_path).services["worker"].claims
    assert spec is not None
    commands: list[str] = []
    ready = threading.Event()

    def monitor() -> None:
        with redis.Redis(port=redis_port).monitor() as m:
            ready.set()
            for event in m.listen():
                commands.append(event["command"].split()[0].upper())
                if event["command"].upper().startswith("ECHO DONE"):
                    return

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    assert ready.wait(5)  # MONITOR acknowledged: every later command is seen
    seen = scan_claims(connect(spec, tmp_path), spec, _live(fake_proc), time.monotonic() + 5)
    r.echo("done")
    watcher.join(10)
    beating = sum(1 for i in range(1200) if i % 7 < 3)
    assert seen.counts() == {"active": beating, "orphaned": 1200 - beating, "invalid": 0}
    used = set(commands) - {"ECHO", "CLIENT", "HELLO"}
    assert used == {"SSCAN", "HMGET", "EXISTS"}, used
    # 7 owners, 3 of them beating: one EXISTS of the 7 keys (3 exist: mixed), then one per key, and the
    # 1,200 claims that share them ask no more
    assert commands.count("EXISTS") == 1 + 7
    assert commands.count("SSCAN") >= 2


def test_ten_thousand_claims_are_counted_right(redis_port: int, tmp_path: Path) -> None:
    """Correctness only; bench/claims.py times the same scan."""
    r = redis.Redis(port=redis_port)
    now = time.time()
    me, dead = os.getpid(), dead_pid()
    with r.pipeline(transaction=False) as pipe:
        for i in range(10_000):
            owner = f"w-{i % 50}"
            pipe.sadd("processing_issues", str(i))
            pipe.hset(f"issue:{i}", mapping={"processId": owner, "pid": str(me if i % 10 else dead),
                                             "startTime": iso(now + i / 1000), "status": "processing"})
            if i % 2 == 0:
                pipe.set(f"heartbeat:{owner}", "1", ex=60)
        pipe.execute()
    spec = claims_config(redis_port, tmp_path).services["worker"].claims
    assert spec is not None
    seen = scan_claims(connect(spec, tmp_path), spec, Liveness(), time.monotonic() + 30, keep=5)
    # even ids: heartbeat; odd ids: this (live) process, except every tenth (dead pid, even: beating)
    assert seen.counts() == {"active": 10_000, "orphaned": 0, "invalid": 0}
    r.delete(*[f"heartbeat:w-{i}" for i in range(0, 50, 2)])
    seen = scan_claims(connect(spec, tmp_path), spec, Liveness(), time.monotonic() + 30, keep=5)
    assert seen.counts() == {"active": 9000, "orphaned": 1000, "invalid": 0}
    assert [c.id_text for c in seen.orphans] == ["0", "10", "20", "30", "40"]  # the oldest, oldest first
    assert seen.oldest_orphan == pytest.approx(now, abs=0.01)


def test_scan_errors_have_a_reason(redis_port: int, tmp_path: Path) -> None:
    r = redis.Redis(port=redis_port)
    r.rpush("processing_issues", "1")  # the wrong type
    spec = claims_config(redis_port, tmp_path).services["worker"].claims
    assert spec is not None
    with pytest.raises(ClaimsScanError) as err:
        scan_claims(connect(spec, tmp_path), spec, Liveness(), time.monotonic() + 5)
    assert err.value.reason == "error" and "WRONGTYPE" in err.value.detail
    r.config_set("requirepass", "s3cret")
    with pytest.raises(ClaimsScanError) as err:
        scan_claims(connect(spec, tmp_path), spec, Liveness(), time.monotonic() + 5)
    assert err.value.reason == "auth"
    gone = claims_config(free_port(), tmp_path).services["worker"].claims
    assert gone is not None
    with pytest.raises(ClaimsScanError) as err:
        scan_claims(connect(gone, tmp_path), gone, Liveness(), time.monotonic() + 5)
    assert err.value.reason == "connection"


# --- the exporter's series -----------------------------------------------------------------------

async def test_claims_series_exist_from_the_first_scrape_and_a_dead_redis_never_fails_it(
        exporter_for: Any, tmp_path: Path) -> None:
    config = parse_config({"exporter": {"state_file": "state.json"}, "services": {
        "worker": {"match": {"comm": "^nothing-matches$"}, "claims": {"port": free_port()}},  # nothing listens
        "plain": {"match": {"comm": "^nothing-matches$"}}}}, base_dir=tmp_path)
    client = await exporter_for(config)
    data = samples(await scrape(client))
    svc = {"service_name": "worker"}
    for state in ("active", "orphaned", "invalid"):
        assert value(data, "caretaker_claims", state=state, **svc) == 0
    assert value(data, "caretaker_claims_oldest_orphan_timestamp_seconds", **svc) == 0
    assert value(data, "caretaker_claims_scan_errors_total", reason="connection", **svc) == 1
    for reason in ("timeout", "auth", "error"):
        assert value(data, "caretaker_claims_scan_errors_total", reason=reason, **svc) == 0
    assert value(data, "caretaker_service_processes", **svc) == 0  # the rest of the scrape is there
    assert not [k for k in data if k[0].startswith("caretaker_claims") and ("service_name", "plain") in k[1]]


async def test_claims_series_show_the_last_scan(exporter_for: Any, redis_port: int, tmp_path: Path) -> None:
    r = redis.Redis(port=redis_port)
    now = time.time()
    put_claim(r, "1", "w-live", os.getpid(), now - 1)
    put_claim(r, "2", "w-dead", dead_pid(), now - 40)
    put_claim(r, "3", "w-dead", dead_pid(), now - 30)
    put_claim(r, "4", "w-beat", dead_pid(), now - 20, heartbeat_ttl=60)
    put_claim(r, "5", "", dead_pid(), now - 10)
    client = await exporter_for(claims_config(redis_port, tmp_path))
    data = samples(await scrape(client))
    svc = {"service_name": "worker"}
    assert [value(data, "caretaker_claims", state=s, **svc) for s in ("active", "orphaned", "invalid")] == [2, 2, 1]
    assert value(data, "caretaker_claims_oldest_orphan_timestamp_seconds", **svc) == pytest.approx(now - 40, abs=0.01)
    assert value(data, "caretaker_claims_scan_errors_total", reason="connection", **svc) == 0
    r.srem("processing_issues", "2", "3")
    data = samples(await scrape(client))
    assert value(data, "caretaker_claims", state="orphaned", **svc) == 0
    assert value(data, "caretaker_claims_oldest_orphan_timestamp_seconds", **svc) == 0


async def test_a_frozen_redis_costs_the_scrape_its_deadline_and_the_late_scan_serves_the_next(
        exporter_for: Any, redis_server: Any, tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.to_thread(redis_server, port)
    r = redis.Redis(port=port)
    put_claim(r, "1", "w-dead", dead_pid(), time.time() - 5)
    client = await exporter_for(claims_config(port, tmp_path))  # claims.timeout: 5s
    data = samples(await scrape(client))
    svc = {"service_name": "worker"}
    assert value(data, "caretaker_claims", state="orphaned", **svc) == 1
    put_claim(r, "2", "w-dead", dead_pid(), time.time() - 5)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        data = samples(await scrape(client, timeout="1.5"))
        took = time.monotonic() - started
    finally:
        os.kill(proc.pid, signal.SIGCONT)  # the scan, waiting for Redis, goes on
    assert took < 1.5, f"the scrape took {took:.2f}s with a 1.5s timeout"
    assert value(data, "caretaker_claims", state="orphaned", **svc) == 1  # the last view

    def late(d: Any) -> float:
        return value(d, "caretaker_claims_scan_errors_total", reason="timeout", **svc)

    deadline = time.monotonic() + 10
    while late(data) < 1 or value(data, "caretaker_claims", state="orphaned", **svc) != 2:
        assert time.monotonic() < deadline, "the late scan was not counted, or its view not shown"
        await asyncio.sleep(0.2)
        data = samples(await scrape(client))
    assert late(data) == 1


def test_the_exporter_needs_only_read_commands(redis_port: int, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    r = redis.Redis(port=redis_port)
    r.acl_setuser("reader", enabled=True, passwords=["+read-pw"], keys=["*"],
                  commands=["+sscan", "+zscan", "+hmget", "+exists"])
    r.acl_setuser("blind", enabled=True, passwords=["+blind-pw"], keys=["*"], commands=["+sscan", "+hmget"])
    put_claim(r, "1", "w-dead", dead_pid(), time.time() - 5)
    monkeypatch.setenv("CLAIMS_PW", "read-pw")
    spec = claims_config(redis_port, tmp_path, username="reader",
                         password={"env": "CLAIMS_PW"}).services["worker"].claims
    assert spec is not None
    seen = scan_claims(connect(spec, tmp_path), spec, Liveness(), time.monotonic() + 5)
    assert seen.counts() == {"active": 0, "orphaned": 1, "invalid": 0}
    monkeypatch.setenv("CLAIMS_PW", "blind-pw")
    spec = claims_config(redis_port, tmp_path, username="blind",
                         password={"env": "CLAIMS_PW"}).services["worker"].claims
    assert spec is not None
    with pytest.raises(ClaimsScanError) as err:
        scan_claims(connect(spec, tmp_path), spec, Liveness(), time.monotonic() + 5)
    assert err.value.reason == "auth" and "exists" in err.value.detail, err.value.detail
