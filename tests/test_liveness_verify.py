"""A restart is verified by the new incarnation's heartbeat, never the old one's: through
a real supervisord, whose ``supervisorctl restart`` lets the old process drain after
SIGTERM, still beating, after the restart began."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exporter.config import parse_config
from exporter.procfs import ProcReader, scan_services
from receiver.actions import ActionContext, RepairFailed, StepLog, restart

from .helpers import AUTH_TOKEN, REPO, free_port, require_binary, serving_exporter, supervisord_conf, wait_until

WORKER = """\
import os, signal, sys, time
from caretaker_client import Heartbeat

mode_file = sys.argv[1]
mode = open(mode_file).read().strip()
draining = []
signal.signal(signal.SIGTERM, lambda *a: (draining.append(time.monotonic()),
                                          print(os.getpid(), "draining", flush=True)))
heartbeat = Heartbeat("worker", interval=0.2).start()
print(os.getpid(), "mode", mode, flush=True)
hold = mode_file + ".hold"  # while it exists, the drain goes on; else it lasts 1.5 s
while True:
    if draining and time.monotonic() - draining[0] > 1.5 and not os.path.exists(hold):
        print(os.getpid(), "drained", flush=True)
        sys.exit(0)
    if mode == "beat":
        heartbeat.beat()  # finishing its current jobs, as a graceful shutdown does
    time.sleep(0.02)
"""


class Supervised:
    """A supervisord running program ``worker`` (tests/WORKER), and the config that names it."""

    def __init__(self, tmp_path: Path, verify_timeout: float) -> None:
        only = tmp_path / "client-only"
        shutil.copytree(REPO / "caretaker_client", only / "caretaker_client")
        self.mode, self.log = tmp_path / "mode", tmp_path / "worker.log"
        self.mode.write_text("beat")
        (tmp_path / "worker.py").write_text(WORKER)
        (tmp_path / "token").write_text(AUTH_TOKEN)
        mark, port = f"lv-{uuid.uuid4().hex[:12]}", free_port()
        self.conf = supervisord_conf(tmp_path, f"""command={sys.executable} -S {tmp_path}/worker.py {self.mode} {mark}
environment=PYTHONPATH="{only}",CARETAKER_EXPORTER_URL="http://127.0.0.1:{port}"
startsecs=0
stopwaitsecs=15
stdout_logfile={tmp_path}/worker.log
redirect_stderr=true
""")
        self.config = parse_config({
            "exporter": {"port": port, "state_file": "heartbeats.json"},
            "receiver": {"bearer_token": {"file": "token"}, "state_file": "state.sqlite"},
            "services": {"worker": {"match": {"cmdline": f"{mark}$"}, "processes": {"min": 1, "max": 1},
                                    "start": {"supervisor": {"program": "worker", "config": str(self.conf)}},
                                    "heartbeats": [{"name": "worker", "timeout": 5}],
                                    "remediation": {"allow": ["restart"], "verify_timeout": verify_timeout}}}},
            base_dir=tmp_path)
        self.daemon = subprocess.Popen([require_binary("supervisord"), "-c", str(self.conf)], start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def pids(self) -> list[int]:
        return [p.pid for p in scan_services(ProcReader(), self.config.services, (os.getpid(),))["worker"]]

    def stop(self) -> None:
        os.killpg(self.daemon.pid, signal.SIGTERM)
        self.daemon.wait(15)


@pytest.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[Any]:
    require_binary("supervisorctl")
    made: list[Supervised] = []

    def make(verify_timeout: float) -> Supervised:
        made.append(Supervised(tmp_path, verify_timeout))
        return made[-1]
    yield make
    for s in made:
        await asyncio.to_thread(s.stop)


async def test_the_old_process_beating_while_it_drains_never_verifies_the_restart(supervised: Any) -> None:
    """verify() took any heartbeat fed after the restart began: supervisorctl restart
    SIGTERMs the old process, which beat while it drained, and the restart was
    "verified" although the new process never beat."""
    sv = supervised(4.0)
    async with serving_exporter(sv.config) as (_url, store), aiohttp.ClientSession() as session:
        await wait_until(lambda: len(sv.pids()) == 1, 15, what="supervisord to start the worker")
        (old,) = sv.pids()
        await wait_until(lambda: store.states["worker"].pid == old and store.states["worker"].beats > 0, 15)
        sv.mode.write_text("never")  # the next incarnation hangs before its loop: it never beats
        steps = StepLog()
        began = time.time()
        with pytest.raises(RepairFailed) as failed:
            await restart(ActionContext(sv.config, session), "worker", steps)
        (new,) = sv.pids()
        assert new != old
        assert store.states["worker"].pid == old and store.states["worker"].last_seen > began  # it did beat, late
        messages = [s["message"] for s in steps.steps]
        assert not any(m.startswith(("verified", "heartbeat worker fresh")) for m in messages), messages
        assert f"heartbeat worker last fed by pid {old}, not a process of the service now" in str(failed.value)


async def test_the_new_process_beating_verifies_the_restart(supervised: Any) -> None:
    sv = supervised(15.0)
    async with serving_exporter(sv.config) as (_url, store), aiohttp.ClientSession() as session:
        await wait_until(lambda: len(sv.pids()) == 1, 15, what="supervisord to start the worker")
        (old,) = sv.pids()
        await wait_until(lambda: store.states["worker"].pid == old and store.states["worker"].beats > 0, 15)
        steps = StepLog()
        await restart(ActionContext(sv.config, session), "worker", steps)
        (new,) = sv.pids()
        fresh, verified = steps.steps[-2], steps.steps[-1]
        assert fresh["message"].startswith("heartbeat worker fresh after ") and fresh["pid"] == new != old
        assert verified["message"].endswith("heartbeats fed: worker")


async def test_a_feed_without_a_pid_counts_only_after_the_new_process_started(supervised: Any) -> None:
    """A plain POST /heartbeat/NAME (no pid) cannot be traced to a process: fed while the
    old process drained it does not count; fed after the new one started, it does, and
    the step says how it was judged."""
    sv = supervised(10.0)
    sv.mode.write_text("never")  # the app's loop never reports itself: a script feeds the heartbeat
    async with serving_exporter(sv.config) as (url, store), aiohttp.ClientSession() as session:
        await wait_until(lambda: len(sv.pids()) == 1, 15, what="supervisord to start the worker")
        (old,) = sv.pids()
        assert (await session.post(f"{url}/heartbeat/worker")).status == 200
        hold = Path(f"{sv.mode}.hold")
        hold.touch()  # the old process drains until the test has fed the heartbeat
        steps = StepLog()
        repair = asyncio.create_task(restart(ActionContext(sv.config, session), "worker", steps))
        await wait_until(lambda: f"{old} draining" in sv.log.read_text(), 15)
        assert (await session.post(f"{url}/heartbeat/worker")).status == 200  # while the old one drains
        assert sv.pids() == [old]
        hold.unlink()
        drained_feed = store.states["worker"].last_seen
        await wait_until(lambda: bool(sv.pids()) and sv.pids() != [old], 15)
        await asyncio.sleep(2.5)  # saved; verify has looked at it and not counted it
        assert not any(s["message"].startswith("heartbeat worker fresh") for s in steps.steps)
        assert (await session.post(f"{url}/heartbeat/worker")).status == 200  # after the new one started
        await asyncio.wait_for(repair, 15)
    fresh = next(s for s in steps.steps if s["message"].startswith("heartbeat worker fresh"))
    assert "fed without a pid" in fresh["message"] and fresh["pid"] == 0
    assert fresh["fed_at"] > drained_feed
    assert steps.steps[-1]["message"].startswith("verified")
