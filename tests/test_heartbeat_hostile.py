"""Heartbeats against careless apps and hostile clients: a sender told to report every 0
seconds, query strings no client of ours sends, and an app that forks its workers after
making its heartbeat (gunicorn's preload)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from caretaker_client import Heartbeat

from .helpers import MakeConfig, free_port, idle_service, serving_exporter, wait_until


@pytest.mark.parametrize(("option", "value"), [
    ("interval", 0), ("interval", -1), ("interval", math.nan), ("interval", math.inf),
    ("timeout", 0), ("timeout", -0.5), ("timeout", math.nan),
])
def test_a_heartbeat_needs_a_positive_interval_and_timeout(option: str, value: float) -> None:
    """Heartbeat(interval=0) spun at full CPU in the app's process: a programming error,
    told at once."""
    with pytest.raises(ValueError, match=f"{option} must be a number of seconds more than 0"):
        Heartbeat("x", "http://127.0.0.1:1", **{option: value})


@pytest.mark.parametrize(("query", "error"), [
    ("pid=%C2%B2", "pid must be a positive process id"),  # '²': str.isdigit() says yes, int() says no
    ("pid=%D9%A3", "pid must be a positive process id"),  # Arabic-Indic 3: int() reads it as 3
    ("pid=" + "9" * 5000, "pid must be a positive process id"),  # int() refuses more than 4,300 digits
    ("pid=0", "pid must be a positive process id"),
    ("beats=%C2%B2", "beats must be a positive count"),
    ("beats=%D9%A3", "beats must be a positive count"),
    ("beats=" + "9" * 5000, "beats must be a positive count"),
    ("beats=+5", "beats must be a positive count"),
])
async def test_a_query_no_client_of_ours_sends_is_a_400_with_a_reason(exporter_for: Any, make_config: MakeConfig,
                                                                      query: str, error: str) -> None:
    """'²' and 5,000-digit numbers made int() raise: 500; an Arabic-Indic digit was taken."""
    client = await exporter_for(make_config(service=idle_service(heartbeats=[{"name": "worker", "timeout": "30s"}])))
    resp = await client.post(f"/heartbeat/worker?{query}")
    assert resp.status == 400, query[:30]
    assert error in (await resp.json())["error"]
    assert (await client.post("/heartbeat/worker?pid=1&beats=3")).status == 200


PRELOAD = """\
import os, sys, time
from caretaker_client import Heartbeat

heartbeat = Heartbeat("app", interval=0.2).start()  # made before the fork, as gunicorn --preload does
pid = os.fork()
if pid == 0:  # a worker: its loop beats
    print(os.getpid(), flush=True)
    for _ in range(100):
        heartbeat.beat()
        time.sleep(0.05)
    os._exit(0)
os.waitpid(pid, 0)  # the master never beats
"""


async def test_a_heartbeat_made_before_the_fork_reports_from_the_worker(make_config: MakeConfig) -> None:
    """Threads do not survive fork(): a worker forked after the heartbeat started beat into
    a sender that no longer ran, and its reports never came."""
    import asyncio
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    from caretaker_client.heartbeat import URL_VARIABLE

    config = make_config(service=idle_service(heartbeats=[{"name": "app", "timeout": "30s"}]),
                         exporter={"port": free_port()})
    async with serving_exporter(config) as (url, store):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PRELOAD, stdout=subprocess.PIPE,
                                                    env={**os.environ, URL_VARIABLE: url}, start_new_session=True)
        try:
            assert proc.stdout is not None
            worker = int(await asyncio.wait_for(proc.stdout.readline(), 30))
            await wait_until(lambda: store.states["app"].pid == worker and store.states["app"].beats > 0, 15)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the master and its worker
            await proc.wait()
    assert store.states["app"].pid == worker != proc.pid
