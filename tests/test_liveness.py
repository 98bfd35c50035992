"""Worker liveness that means something, with real processes: a worker whose work loop
deadlocks while its process and threads live goes stale (its loop stopped beating), the
receiver confirms ``CaretakerHeartbeatMissing`` and restarts it, and a restart of a
service with heartbeats is verified only once the new incarnation's heartbeat arrives.

The worker has only ``caretaker_client`` on its path (``python -S``, a copy of the
package on ``PYTHONPATH``): no site-packages, none of caretaker's other packages.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exporter.config import Config
from receiver.actions import RepairFailed, StepLog, restart
from receiver.heartbeats import SAVE_LAG
from receiver.process import start_service

from .helpers import (
    DEADLOCKING_WORKER,
    REPO,
    MakeConfig,
    alert,
    free_port,
    kill_child,
    pids,
    post_alerts,
    samples,
    serving_exporter,
    settle,
    value,
    wait_audit,
    wait_until,
)

TIMEOUT = 2.0
"""The worker heartbeat's timeout in the config (seconds)."""
INTERVAL = 0.2
"""The worker's sender interval (seconds)."""

def worker_config(make_config: MakeConfig, tmp_path: Path, verify_timeout: float = 15.0,
                  heartbeats: bool = True) -> Config:
    """Service ``worker``: :data:`helpers.DEADLOCKING_WORKER` with only caretaker_client on its path, its
    heartbeat ``worker`` (unless not ``heartbeats``), the exporter on a free port."""
    only = tmp_path / "client-only"
    shutil.copytree(REPO / "caretaker_client", only / "caretaker_client")
    (tmp_path / "ready-after").write_text("0")
    port, marker = free_port(), f"lv-{uuid.uuid4().hex[:12]}"
    return make_config({"worker": {
        "match": {"cmdline": f"{marker}$"},
        "processes": {"min": 1, "max": 1},
        "start": {"argv": [sys.executable, "-S", "-c", DEADLOCKING_WORKER, str(tmp_path / "deadlock"),
                           str(tmp_path / "ready-after"), str(INTERVAL), marker],
                  "env": {"PYTHONPATH": str(only), "CARETAKER_EXPORTER_URL": f"http://127.0.0.1:{port}"},
                  "log_file": "worker.log"},
        "stop": {"grace_period": 2},
        "heartbeats": [{"name": "worker", "timeout": TIMEOUT}] if heartbeats else [],
        "remediation": {"allow": ["restart"], "verify_timeout": verify_timeout}}},
        exporter={"port": port, "state_file": "heartbeats.json"}, token=True, recheck_interval="200ms")


def saved_last_seen(tmp_path: Path) -> float:
    """When the worker heartbeat was last fed, as the exporter last saved it for the
    receiver to read (0 before it saves)."""
    try:
        return float(json.loads((tmp_path / "heartbeats.json").read_text())["heartbeats"]["worker"]["last_seen"])
    except (OSError, ValueError, KeyError):
        return 0.0


def first_beat(tmp_path: Path, pid: int) -> float:
    """When the worker ``pid`` says its loop began (from its log)."""
    found = re.search(rf"^pid {pid} first beat at ([0-9.]+)$", (tmp_path / "worker.log").read_text(), re.M)
    assert found, (tmp_path / "worker.log").read_text()
    return float(found.group(1))


def threads(pid: int) -> tuple[str, int]:
    """The process's state letter and its number of threads, from /proc/PID/status."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return status["State"].split()[0], int(status["Threads"])


async def metrics(url: str) -> dict[Any, float]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        return samples(await resp.text())


def steps_of(entry: dict[str, Any]) -> tuple[list[str], Callable[[str], dict[str, Any]]]:
    messages = [s["message"] for s in entry["steps"]]

    def step(prefix: str) -> dict[str, Any]:
        (found,) = [s for s in entry["steps"] if s["message"].startswith(prefix)]
        return dict(found)
    return messages, step


async def test_a_deadlocked_loop_goes_stale_is_restarted_and_verified_by_its_new_heartbeat(
        receiver_for: Any, make_config: MakeConfig, tmp_path: Path) -> None:
    config = worker_config(make_config, tmp_path)
    labels = {"service_name": "worker", "heartbeat": "worker"}
    async with serving_exporter(config) as (url, store):
        client = await receiver_for(config)
        first = start_service(config, "worker")
        try:
            state = store.states["worker"]
            await wait_until(lambda: state.pid == first.pid and state.beats > 0, 20)

            # The work loop deadlocks on a lock; the process and its threads (main, sender, holder) live on.
            (tmp_path / "deadlock").touch()
            await wait_until(lambda: "deadlocks after" in (tmp_path / "worker.log").read_text(), 10)
            deadlocked_at = time.time()
            await wait_until(lambda: time.time() - state.last_seen > TIMEOUT + SAVE_LAG + 0.5, 20)  # stale, saved
            assert threads(first.pid) == ("S", 3)
            assert pids(config, "worker") == [first.pid]
            assert state.last_seen <= deadlocked_at + INTERVAL + 0.5  # nothing reported since the loop stopped
            seen = await metrics(url)
            assert time.time() - value(seen, "caretaker_heartbeat_last_timestamp_seconds", **labels) > \
                value(seen, "caretaker_heartbeat_timeout_seconds", **labels)  # the alert's expression holds
            assert value(seen, "caretaker_heartbeat_process_alive", **labels) == 1
            beats_when_stale = value(seen, "caretaker_heartbeat_beats_total", **labels)
            assert beats_when_stale == state.beats > 0

            # The next incarnation needs a second before its loop runs: verification must wait for it.
            (tmp_path / "ready-after").write_text("1.0")
            await post_alerts(client, alert("hb1", alertname="CaretakerHeartbeatMissing", remediation="restart",
                                            **labels))
            await wait_audit(client, lambda es: any(e["result"] == "success" for e in es), 40)
            await asyncio.sleep(2)  # the problem stays open: the receiver keeps looking, and must not act again
            entries = await settle(client)
        finally:
            await kill_child(first)
        (entry,) = [e for e in entries if e["decision"] == "acted"]
        assert entry["result"] == "success", entry
        assert entry["observation"]["holds"] is True
        assert re.fullmatch(r"worker last seen \d+s ago", entry["observation"]["condition"])
        messages, step = steps_of(entry)
        started, fresh, verified = step("started "), step("heartbeat worker fresh after "), step("verified: ")
        (new,) = pids(config, "worker")
        assert started["message"].endswith(f"as pid {new}")
        assert messages.index(started["message"]) < messages.index(fresh["message"]) < len(messages) - 1
        assert verified["message"] == ("verified: 1 processes, probes passing: none configured, "
                                       "heartbeats fed: worker")
        assert fresh["pid"] == new
        loop_began = first_beat(tmp_path, new)
        assert started["at"] < loop_began <= fresh["fed_at"] <= fresh["at"] <= verified["at"]
        assert verified["at"] - started["at"] >= 1.0  # it did not pass while the new process had not beaten yet
        assert not [e for e in entries if e["decision"] == "acted" and e is not entry]
        await wait_until(lambda: store.states["worker"].beats > beats_when_stale + 10, 10)  # its loop runs


async def test_a_restart_is_not_verified_until_a_heartbeat_comes_and_fails_when_none_does(
        ctx_for: Any, make_config: MakeConfig, tmp_path: Path) -> None:
    ctx = ctx_for(worker_config(make_config, tmp_path, verify_timeout=3.0))
    async with serving_exporter(ctx.config) as (_url, store):
        first = start_service(ctx.config, "worker")
        ctx.reaper.add(first)
        await wait_until(lambda: store.states["worker"].pid == first.pid and store.states["worker"].beats > 0, 20)
        await wait_until(lambda: saved_last_seen(tmp_path) > 0, 10, what="the exporter to save the heartbeat")

        # The new process runs at once (processes in range, no probe), but its loop never beats.
        (tmp_path / "ready-after").write_text("3600")
        steps = StepLog()
        with pytest.raises(RepairFailed) as failed:
            await restart(ctx, "worker", steps)
        # The old process's last report may land just before the restart began, or just
        # after (before its SIGTERM): either way the heartbeat was not fed by the new one.
        assert re.fullmatch(r"not healthy within 3s: heartbeat worker (not fed since the restart began "
                            rf"\(last fed \d+\.\ds before it\)|last fed by pid {first.pid}, not a process of the "
                            r"service now \(the old incarnation\?\))(; its log ends: .*)?", str(failed.value), re.S)
        messages = [s["message"] for s in steps.steps]
        assert not any(m.startswith(("verified", "heartbeat worker fresh")) for m in messages), messages
        started = next(s for s in steps.steps if s["message"].startswith("started "))
        assert time.time() - started["at"] >= 3.0  # it waited verify_timeout, not 0.01s

        # Its loop beats after 1 s: verified then, not before.
        (tmp_path / "ready-after").write_text("1.0")
        steps = StepLog()
        await restart(ctx, "worker", steps)
        (new,) = pids(ctx.config, "worker")
        started = next(s for s in steps.steps if s["message"].startswith("started "))
        fresh, verified = steps.steps[-2], steps.steps[-1]
        assert fresh["message"].startswith("heartbeat worker fresh after ") and fresh["pid"] == new
        assert float(fresh["message"].rsplit(" ", 1)[1].rstrip("s")) >= 1.0
        assert verified["message"].endswith("heartbeats fed: worker")
        assert verified["at"] - started["at"] >= 1.0
        assert first_beat(tmp_path, new) <= fresh["fed_at"] <= verified["at"]


async def test_a_service_without_heartbeats_is_verified_as_before(ctx_for: Any, make_config: MakeConfig,
                                                                  tmp_path: Path) -> None:
    ctx = ctx_for(worker_config(make_config, tmp_path, heartbeats=False))
    (tmp_path / "ready-after").write_text("3600")  # it never beats: nobody waits for it
    steps = StepLog()
    await restart(ctx, "worker", steps)
    assert steps.steps[-1]["message"] == "verified: 1 processes, probes passing: none configured"
    assert not any(s["message"].startswith("heartbeat") for s in steps.steps)


def test_the_exporter_state_the_receiver_reads_is_named_when_missing(make_config: MakeConfig, tmp_path: Path) -> None:
    from receiver import heartbeats

    config = worker_config(make_config, tmp_path)
    held, why = heartbeats.late(config, "worker", "worker", time.time())
    assert held is None and "heartbeats.json does not exist" in why
    fresh, why = heartbeats.fed_since(config, ["worker"], time.time())
    assert fresh == {} and "does not exist" in why
    assert heartbeats.late(config, "worker", "typo", time.time()) == (None, "no such heartbeat")
    saved = tmp_path / "heartbeats.json"
    saved.write_text(json.dumps({"heartbeats": {"worker": {"last_seen": time.time() - 60}}}))
    held, why = heartbeats.late(config, "worker", None, time.time())
    assert held is True and re.fullmatch(r"worker last seen (59|60|61)s ago", why)
    since = time.time() - 30
    fresh, why = heartbeats.fed_since(config, ["worker"], since)
    assert fresh == {} and "last fed 30.0s before it" in why
    now = time.time()
    saved.write_text(json.dumps({"heartbeats": {"worker": {"last_seen": now, "last_failure": now + 1}}}))
    assert heartbeats.fed_since(config, ["worker"], since)[1] == "heartbeat worker reported failing after the restart"
    assert heartbeats.late(config, "worker", "worker", now) == (False, "heartbeats fresh")
    # Past its timeout in the file, but a feed since may not be saved yet: not late until the lag is over too.
    saved.write_text(json.dumps({"heartbeats": {"worker": {"last_seen": now - TIMEOUT - 0.5}}}))
    assert heartbeats.late(config, "worker", "worker", now) == (False, "heartbeats fresh")
    assert heartbeats.late(config, "worker", "worker", now + SAVE_LAG)[0] is True
    saved.chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        assert "cannot read the exporter's heartbeat state" in heartbeats.late(config, "worker", None, now)[1]
