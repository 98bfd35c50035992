"""Helpers of the claims tests: a config with ``claims:``, claims written as a worker
of the issue's layout writes them, and the real worker program."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from exporter.claims import ClaimsSeen, Liveness, connect, scan_claims
from exporter.config import Claims, Config
from receiver.actions import StepLog

from .helpers import REPO, Children, build_config, idle_service

WORKER = REPO / "tests" / "claims_worker.py"


def claims_config(port: int, tmp_path: Path, service: str = "worker", **claims: Any) -> Config:
    """One service ``service`` (no process of it runs, and none need to) with
    ``claims: {port, **claims}`` that allows ``release_claims`` (made by
    :func:`helpers.build_config` in ``tmp_path``; the claims block is what differs)."""
    return build_config(tmp_path, {service: idle_service(processes={"min": 0}, claims={"port": port, **claims},
                                                         remediation={"allow": ["release_claims"]})})


def iso(when: float) -> str:
    """ISO 8601 in UTC with milliseconds, as JavaScript's ``toISOString()`` writes it."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def put_claim(r: redis.Redis, item_id: str, owner: str, pid: int | str | None, claimed_at: float | str,
              host: str | None = None, heartbeat_ttl: float | None = None, **extra: str) -> None:
    """A claim in the issue's layout: the id in ``processing_issues``, ``issue:{id}`` with
    ``status=processing``, the owner, pid, host and claim time (a float is written as
    ISO 8601), and ``heartbeat:{owner}`` if ``heartbeat_ttl`` is given."""
    fields: dict[str, str] = {"status": "processing", "processId": owner, "taskType": "summarize", **extra}
    fields["startTime"] = iso(claimed_at) if isinstance(claimed_at, float) else claimed_at
    if pid is not None:
        fields["pid"] = str(pid)
    if host is not None:
        fields["host"] = host
    with r.pipeline(transaction=True) as pipe:
        pipe.sadd("processing_issues", item_id)
        pipe.hset(f"issue:{item_id}", mapping=fields)  # type: ignore[arg-type]
        if heartbeat_ttl is not None:
            pipe.set(f"heartbeat:{owner}", "1", px=int(heartbeat_ttl * 1000))
        pipe.execute()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) just now. (``true`` ends at
    once: waiting for it costs an event loop nothing worth a thread.)"""
    pid = os.posix_spawnp("true", ["true"], os.environ)
    os.waitpid(pid, 0)
    return pid


def worker_env(port: int) -> dict[str, str]:
    return {**os.environ, "CARETAKER_CLAIMS_REDIS_URL": f"redis://127.0.0.1:{port}/0"}


def start_worker(children: Children, port: int, tag: str, *args: str, log: Path | None = None) -> Any:
    """The real worker program (tests/claims_worker.py), its output to ``log``."""
    out = open(log, "ab") if log is not None else None  # the child has its own copy once started
    try:
        return children.start([sys.executable, str(WORKER), "--tag", tag, *args], env=worker_env(port),
                               **({"stdout": out, "stderr": out} if out is not None else {}))
    finally:
        if out is not None:
            out.close()


def spec_of(config: Config) -> Claims:
    """The ``claims:`` block of service ``worker``."""
    spec = config.services["worker"].claims
    assert spec is not None
    return spec


def scan(config: Config, keep: int = 0, liveness: Liveness | None = None) -> ClaimsSeen:
    """One scan of service ``worker``'s claims, as the exporter makes it (``keep``
    orphans and invalid claims kept as examples)."""
    spec = spec_of(config)
    return scan_claims(connect(spec, config.base_dir), spec, liveness or Liveness(), time.monotonic() + 10,
                       keep=keep)


async def watch_the_slow_job(r: redis.Redis, config: Config, release_claims: Callable[[Config], Awaitable[StepLog]],
                             seconds: float | None = None) -> list[float]:
    """Every 0.3 s while item ``slow`` is worked on (until ``done:slow`` is set, or for
    ``seconds``): a scan sees its claim active, and a release_claims releases nothing.
    Returns when each look was made (``time.monotonic()``)."""
    looks: list[float] = []
    while r.get("done:slow") is None and (seconds is None or not looks or time.monotonic() - looks[0] < seconds):
        seen = scan(config)
        if r.get("done:slow") is None:
            assert seen.counts() == {"active": 1, "orphaned": 0, "invalid": 0}
        steps = await release_claims(config)
        assert not any(s.get("released") for s in steps.steps), steps.steps
        looks.append(time.monotonic())
        await asyncio.sleep(0.3)
    return looks
