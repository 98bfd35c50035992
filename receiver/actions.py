"""Repairs. ``restart``: stop gracefully, start detached, verify.

The restart state machine, as a careful operator would do it::

    find processes -> send stop signal (default SIGTERM) -> wait grace_period
      -> SIGKILL whatever is left -> wait until gone
      -> if the service already runs its min processes: do not start a second copy
      -> start argv detached (own session; stdout/stderr to log_file)
      -> verify: processes within [min, max] and every probe passes, within verify_timeout

Signals go to a process's whole group only when the process leads its group (as a
service that caretaker started does, or a daemon); otherwise to the process alone,
so a service started from someone's shell never takes that shell down. Each target
is checked to be the same process as scanned (pid and start time) through a pidfd
before it is signalled, so a reused pid is never hit. Nothing here goes through a
shell; argv comes from the config only, never from an alert.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from exporter.config import Config, ServiceConfig
from exporter.probes import ProbeContext, run_probes
from exporter.procfs import ProcessInfo, ProcReader, scan_services

__all__ = ["ActionContext", "ChildReaper", "RepairFailed", "StepLog", "restart"]

log = logging.getLogger(__name__)

KILL_WAIT_SECONDS = 5.0
POLL_SECONDS = 0.1


class RepairFailed(Exception):
    """The repair did not bring the service back; the message says why."""


@dataclass
class StepLog:
    """What a repair did, step by step (goes to the audit trail)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    on_step: Callable[[list[dict[str, Any]]], None] | None = None

    def __call__(self, message: str, **data: Any) -> None:
        self.steps.append({"at": time.time(), "message": message, **data})
        log.info("%s", message)
        if self.on_step is not None:
            self.on_step(self.steps)


class ChildReaper:
    """Keeps the services the receiver started and reaps them when they exit.

    Without it a service the receiver started and later killed would linger as a
    zombie of the receiver. Only these Popen objects are waited for (never ``-1``).
    """

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def add(self, child: subprocess.Popen[bytes]) -> None:
        self.children.append(child)

    def reap(self) -> None:
        self.children = [c for c in self.children if c.poll() is None]


@dataclass
class ActionContext:
    config: Config
    session: aiohttp.ClientSession
    reader: ProcReader = field(default_factory=ProcReader)
    reaper: ChildReaper = field(default_factory=ChildReaper)

    @property
    def probes(self) -> ProbeContext:
        return ProbeContext(self.session, self.config.base_dir)


async def find_processes(ctx: ActionContext, name: str) -> list[ProcessInfo]:
    found = await asyncio.to_thread(scan_services, ctx.reader, {name: ctx.config.services[name]},
                                    (os.getpid(),), False)
    return found[name]


def _describe(p: ProcessInfo) -> dict[str, Any]:
    return {"pid": p.pid, "pgid": p.pgid, "comm": p.comm, "state": p.state,
            "rss_bytes": p.rss_bytes, "cpu_seconds": p.cpu_seconds,
            "age_seconds": round(time.time() - p.start_time_seconds, 3)}


def _same_process(reader: ProcReader, p: ProcessInfo) -> bool:
    now = reader.stat(p.pid)
    return now is not None and now.start_ticks == p.start_ticks


def send_signal(reader: ProcReader, processes: list[ProcessInfo], sig: signal.Signals) -> list[str]:
    """Signal each process (or the group it leads). Returns what was done, one line each.

    Blocking but quick; a process that is already gone is skipped.
    """
    done: list[str] = []
    own_group = os.getpgrp()
    groups: set[int] = set()
    for p in processes:
        try:
            pidfd = os.pidfd_open(p.pid)
        except ProcessLookupError:
            continue
        try:
            if not _same_process(reader, p):
                continue  # the pid now belongs to someone else
            if p.pgid == p.pid and p.pgid != own_group:
                if p.pgid in groups:
                    continue
                groups.add(p.pgid)
                os.killpg(p.pgid, sig)
                done.append(f"{sig.name} to process group {p.pgid} ({p.comm})")
            else:
                signal.pidfd_send_signal(pidfd, sig)
                done.append(f"{sig.name} to pid {p.pid} ({p.comm})")
        except ProcessLookupError:
            continue
        finally:
            os.close(pidfd)
    return done


async def wait_gone(reader: ProcReader, processes: list[ProcessInfo], timeout: float) -> list[ProcessInfo]:
    """Wait until none of ``processes`` runs (zombies count as gone); returns those left."""
    deadline = time.monotonic() + timeout
    left = processes
    while True:
        left = [p for p in left if _same_process(reader, p)]
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(POLL_SECONDS)


def start_service(config: Config, name: str) -> subprocess.Popen[bytes]:
    """Start the service detached: own session, stdin from /dev/null, output to its log file.

    The caller must reap the returned child (see :class:`ChildReaper`). Raises
    ``RepairFailed`` if it cannot be started (missing program, bad cwd...).
    """
    cfg = config.services[name]
    assert cfg.start is not None
    cwd = config.resolve(cfg.start.cwd) if cfg.start.cwd else config.base_dir
    log_path = config.resolve(cfg.start.log_file) if cfg.start.log_file else None
    env = {**os.environ, **cfg.start.env}
    try:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out: Any = open(log_path, "ab")
        else:
            out = subprocess.DEVNULL
        try:
            child = subprocess.Popen(list(cfg.start.argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
    except OSError as err:
        raise RepairFailed(f"cannot start {cfg.start.argv[0]!r}: {err}") from err
    return child


async def verify(ctx: ActionContext, name: str, timeout: float, step: StepLog,
                 child: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until the service runs ``[min, max]`` processes and all probes pass.

    Raises ``RepairFailed`` with the last problem seen when ``timeout`` runs out, or
    at once if the started child exited with an error and nothing runs.
    """
    cfg: ServiceConfig = ctx.config.services[name]
    deadline = time.monotonic() + timeout
    problem = "not checked"
    while True:
        procs = await find_processes(ctx, name)
        n = len(procs)
        if not cfg.processes.min <= n <= cfg.processes.max:
            problem = f"{n} processes, expected {cfg.processes.min}..{cfg.processes.max}"
            if child is not None and n == 0 and child.poll() not in (None, 0):
                raise RepairFailed(f"started process exited with status {child.returncode}; {problem}")
        else:
            remaining = max(0.1, deadline - time.monotonic())
            results = await run_probes(cfg.probes, ctx.probes, remaining)
            failing = {k: r for k, r in results.items() if not r.success}
            if not failing:
                step(f"verified: {n} processes, probes passing: {', '.join(results) or 'none configured'}")
                return
            problem = "; ".join(f"probe {k}: {r.reason} ({r.detail})" for k, r in failing.items())
        if time.monotonic() >= deadline:
            raise RepairFailed(f"not healthy within {timeout:g}s: {problem}")
        await asyncio.sleep(0.25)


async def restart(ctx: ActionContext, name: str, step: StepLog) -> None:
    """Restart service ``name`` (see the module docstring). Raises ``RepairFailed``."""
    cfg = ctx.config.services[name]
    if cfg.start is None:
        raise RepairFailed("the service has no start command")
    stop_signal = signal.Signals[cfg.stop.signal]
    procs = await find_processes(ctx, name)
    if procs:
        step(f"found {len(procs)} processes", processes=[_describe(p) for p in procs])
        for line in await asyncio.to_thread(send_signal, ctx.reader, procs, stop_signal):
            step(line)
        left = await wait_gone(ctx.reader, procs, cfg.stop.grace_period)
        if left:
            step(f"{len(left)} processes still there after {cfg.stop.grace_period:g}s grace period",
                 processes=[_describe(p) for p in left])
            for line in await asyncio.to_thread(send_signal, ctx.reader, left, signal.SIGKILL):
                step(line)
            left = await wait_gone(ctx.reader, left, KILL_WAIT_SECONDS)
            if left:
                raise RepairFailed(f"processes {[p.pid for p in left]} survived SIGKILL "
                                   f"(states {[p.state for p in left]}; uninterruptible sleep?)")
        step("all processes stopped")
    else:
        step("no processes running")
    ctx.reaper.reap()
    running = await find_processes(ctx, name)
    child = None
    if len(running) >= max(cfg.processes.min, 1):
        step(f"{len(running)} processes already running (started by someone else); not starting a second copy",
             processes=[_describe(p) for p in running])
    else:
        child = await asyncio.to_thread(start_service, ctx.config, name)
        ctx.reaper.add(child)
        step(f"started {' '.join(cfg.start.argv)} as pid {child.pid}")
    await verify(ctx, name, cfg.remediation.verify_timeout, step, child)


ACTIONS = {"restart": restart}


async def run_action(ctx: ActionContext, action: str, name: str, step: StepLog) -> None:
    """Run a known repair; ``action`` must be one the service allows (checked by the caller)."""
    func = ACTIONS.get(action)
    if func is None:
        raise RepairFailed(f"unknown action {action!r}")
    await func(ctx, name, step)
