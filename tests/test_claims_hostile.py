"""Work claims against hostile or careless data, with a real Redis: field values no
worker should write, keys of the wrong type, scripts that must apply all or nothing,
claim times in the wrong unit or zone, configurations that would lose jobs, and a scan
that must never hold up anything else of the exporter."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from exporter.claims import Liveness, connect, scan_claims
from exporter.config import Claims, Config
from exporter.procfs import ProcessInfo, ProcReader
from receiver.actions import ActionContext, StepLog
from receiver.catalogue import run_action

from .claims_util import claims_config, dead_pid, put_claim
from .test_exporter import samples, scrape, value

SVC = {"service_name": "worker"}


@pytest.fixture
def r(redis_port: int) -> redis.Redis:
    return redis.Redis(port=redis_port, decode_responses=True)


@pytest.fixture
async def release_claims() -> AsyncIterator[Callable[[Config], Any]]:
    """release_claims(config) -> the StepLog of one release_claims of service ``worker``."""
    async with aiohttp.ClientSession() as session:
        async def go(config: Config) -> StepLog:
            steps = StepLog()
            await run_action(ActionContext(config, session, ProcReader()), "release_claims", "worker", steps)
            return steps
        yield go


def spec_of(config: Config) -> Claims:
    spec = config.services["worker"].claims
    assert spec is not None
    return spec


def judged(config: Config, liveness: Liveness | None = None) -> dict[str, tuple[str, str]]:
    """Each claim's (state, reason) from one scan (every orphan and every invalid kept)."""
    spec = spec_of(config)
    seen = scan_claims(connect(spec, config.base_dir), spec, liveness or Liveness(), time.monotonic() + 10, keep=1000)
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
                                                                            tmp_path: Path) -> None:
    now = time.time()
    bad, dead = dead_pid(), dead_pid()
    put_claim(r, "cursed", "w-1", bad, now - 30)
    put_claim(r, "plain", "w-2", dead, now - 20)
    put_claim(r, "alive", "w-3", os.getpid(), now)  # claimed after this process started
    verdicts = judged(claims_config(redis_port, tmp_path), Liveness(_Failing(bad)))
    assert verdicts == {"cursed": ("invalid", "unreadable"), "plain": ("orphaned", "owner_dead")}
