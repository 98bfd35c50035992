"""Repairs. ``restart``: stop gracefully, start detached, verify.

The restart state machine, as a careful operator would do it::

    find processes -> send stop signal (default SIGTERM), then SIGCONT (a stopped,
      frozen process can then act on it, as systemd does) -> wait grace_period
      -> SIGKILL whatever is left -> wait until gone
      -> stop the leftovers of that incarnation (children and session members that
         outlived it, e.g. PostgreSQL backends of a SIGKILLed postmaster), gracefully
      -> if the service already runs its min processes: do not start a second copy
      -> start argv detached (own session; stdout/stderr to log_file)
      -> verify: processes within [min, max], every probe passes, and each of the
         service's heartbeats is fed by the new incarnation (after the start, by one of
         the service's processes that started after it), within
         verify_timeout (a start that exits at once fails at once, with the tail of its log)

The other repairs on processes: ``stop_duplicates``, ``free_port`` and ``signal``.
How processes are signalled, stopped and started (a pidfd check against pid reuse,
groups only when a process leads its own) is :mod:`receiver.process`; what it cannot
do fails the repair (:class:`RepairFailed`). Nothing here goes through a shell; argv
comes from the config only, never from an alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from exporter.config import Config, ServiceConfig
from exporter.probes import ProbeContext, run_probes
from exporter.procfs import ProcessInfo, ProcReader, keep_order, read_pidfile, scan_services
from exporter.sockets import check_port, port_holders

from . import heartbeats
from .family import FamilyTracker
from .process import (
    KILL_WAIT_SECONDS,
    ChildReaper,
    ProcessError,
    describe,
    run_command,
    send_signal_each,
    start_problems,
    start_service,
    stop_gracefully,
)

# KILL_WAIT_SECONDS, ChildReaper and start_problems are receiver.process's: the executor
# and the app import them from here, with what a repair needs.
__all__ = ["ACTIONS", "KILL_WAIT_SECONDS", "ActionContext", "ActionFunc", "ChildReaper", "RepairFailed", "StepLog",
           "failing_repair", "find_processes", "restart", "start_problems"]

log = logging.getLogger(__name__)

VERIFY_POLL_SECONDS = 0.1
START_SETTLE_SECONDS = 0.3
"""How long a service the receiver just started must stay healthy to be verified."""
LOG_TAIL = 2048


class RepairFailed(Exception):
    """The repair did not bring the service back; the message says why."""


@dataclass
class StepLog:
    """What a repair did, step by step (goes to the audit trail)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    on_step: Callable[[list[dict[str, Any]]], None] | None = None

    def __call__(self, message: str, /, **data: Any) -> None:
        self.steps.append({"at": time.time(), "message": message, **data})
        log.info("%s", message)
        if self.on_step is not None:
            self.on_step(self.steps)


EvidenceFunc = Callable[[str, list[ProcessInfo], "StepLog"], Awaitable[None]]


async def _no_evidence(name: str, procs: list[ProcessInfo], step: StepLog) -> None:
    return None


@dataclass
class ActionContext:
    """What a repair may use. ``labels`` are the alert's, for ``exec`` placeholders only."""

    config: Config
    session: aiohttp.ClientSession
    reader: ProcReader = field(default_factory=ProcReader)
    reaper: ChildReaper = field(default_factory=ChildReaper)
    evidence: EvidenceFunc = _no_evidence
    labels: Mapping[str, str] = field(default_factory=dict)
    backups: object | None = None
    """The receiver's :class:`receiver.repairs.BackupKeeper`, for ``restore_file``."""
    family: FamilyTracker | None = None
    """Processes of each service's last incarnation, for stopping its leftovers."""
    may_start: Callable[[str], Awaitable[bool]] | None = None
    """Asked just before a service is started: False when an operator paused it while
    its repair ran (the repair then ends without starting it)."""

    async def keep_evidence(self, name: str, procs: list[ProcessInfo], step: StepLog) -> None:
        """Record what a person would want to see, before something is stopped."""
        try:
            await self.evidence(name, procs, step)
        except Exception as err:  # evidence must never prevent the repair
            log.warning("could not keep evidence for %s: %s", name, err)
            step(f"evidence not kept: {err}")

    @property
    def probes(self) -> ProbeContext:
        return ProbeContext(self.session, self.config.base_dir)


async def find_processes(ctx: ActionContext, name: str) -> list[ProcessInfo]:
    found = await asyncio.to_thread(scan_services, ctx.reader, {name: ctx.config.services[name]},
                                    (os.getpid(),), False)
    return found[name]


async def verify(ctx: ActionContext, name: str, timeout: float, step: StepLog,
                 child: subprocess.Popen[bytes] | None = None, heartbeats_since: float | None = None,
                 started_after: float | None = None) -> None:
    """Wait until the service runs ``[min, max]`` processes and all probes pass and, when
    ``heartbeats_since`` is given (Unix seconds: when a restart started the service), until
    each of its heartbeats has been fed after that by one of the processes just found (or a
    descendant), which, with ``started_after`` (Unix seconds: the receiver started a new
    incarnation then), started at or after it: never by the old incarnation draining
    after SIGTERM (read from the exporter's state file, which it saves at most once a
    second: :mod:`receiver.heartbeats`). A heartbeat that turns fresh is a step,
    ``heartbeat NAME fresh after Ns``; one fed without a pid says so.

    Raises ``RepairFailed`` with the last problem seen when ``timeout`` runs out, or
    at once if the started child exited with an error and nothing runs.
    """
    cfg: ServiceConfig = ctx.config.services[name]
    deadline = time.monotonic() + timeout
    problem = "not checked"
    healthy_since: float | None = None
    waiting = [hb.name for hb in cfg.heartbeats] if heartbeats_since is not None else []
    fed: list[str] = []
    while True:
        procs = await find_processes(ctx, name)
        n = len(procs)
        if not cfg.processes.min <= n <= cfg.processes.max:
            problem = f"{n} processes, expected {cfg.processes.min}..{cfg.processes.max}"
            healthy_since = None
            if child is not None and n == 0 and child.poll() not in (None, 0):
                tail = await asyncio.to_thread(log_tail, ctx.config, name)
                raise RepairFailed(f"started process exited with status {child.returncode}; {problem}"
                                   + (f"; its log ends: {tail}" if tail else ""))
        else:
            remaining = max(0.1, deadline - time.monotonic())
            results = await run_probes(cfg.probes, ctx.probes, remaining)
            failing = {k: r for k, r in results.items() if not r.success}
            if not failing:
                now = time.monotonic()
                healthy_since = now if healthy_since is None else healthy_since
                if waiting:
                    assert heartbeats_since is not None
                    fresh, problem = await asyncio.to_thread(heartbeats.fed_since, ctx.config, waiting,
                                                             heartbeats_since, procs, ctx.reader, started_after)
                    for hb, state in fresh.items():
                        step(f"heartbeat {hb} fresh after {state.last_seen - heartbeats_since:.1f}s"
                             + ("" if state.pid else " (fed without a pid: which process fed it cannot be told; "
                                "counted as it came after the service's newest process started)"),
                             heartbeat=hb, fed_at=state.last_seen, pid=state.pid)
                    fed += fresh
                    waiting = [hb for hb in waiting if hb not in fresh]
                # A process that dies right after its start (a port in use, a bad config)
                # is often still there at the first look: a fresh start must stay healthy
                # a moment, as supervisord's startsecs asks.
                settled = child is None or now - healthy_since >= START_SETTLE_SECONDS or timeout <= 0
                if settled and not waiting:
                    step(f"verified: {n} processes, probes passing: {', '.join(results) or 'none configured'}"
                         + (f", heartbeats fed: {', '.join(fed)}" if fed else ""))
                    return
                if not waiting:
                    await asyncio.sleep(VERIFY_POLL_SECONDS)
                    continue
            else:
                problem = "; ".join(f"probe {k}: {r.reason} ({r.detail})" for k, r in failing.items())
                healthy_since = None
        if time.monotonic() >= deadline:
            tail = await asyncio.to_thread(log_tail, ctx.config, name) if child is not None else ""
            raise RepairFailed(f"not healthy within {timeout:g}s: {problem}"
                               + (f"; its log ends: {tail}" if tail else ""))
        await asyncio.sleep(VERIFY_POLL_SECONDS)


def log_tail(config: Config, name: str, limit: int = LOG_TAIL) -> str:
    """The last ``limit`` bytes of the service's ``start.log_file`` (blocking), or ""."""
    cfg = config.services[name]
    if cfg.start is None or not cfg.start.log_file:
        return ""
    try:
        with open(config.resolve(cfg.start.log_file), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def failing_repair() -> Iterator[None]:
    """A process that cannot be started or stopped, or a command that cannot be run in
    time (:class:`~receiver.process.ProcessError`), fails the repair with that reason."""
    try:
        yield
    except ProcessError as err:
        raise RepairFailed(str(err)) from err


async def stop_service_processes(ctx: ActionContext, name: str, procs: list[ProcessInfo], step: StepLog,
                                 whole_groups: bool = True) -> None:
    """Stop ``procs`` with the service's ``stop`` signal and grace period (see
    :func:`receiver.process.stop_gracefully`); ``RepairFailed`` if some survive SIGKILL."""
    stop = ctx.config.services[name].stop
    with failing_repair():
        await stop_gracefully(ctx.reader, procs, signal.Signals[stop.signal], stop.grace_period, step, whole_groups)


async def restart(ctx: ActionContext, name: str, step: StepLog) -> None:
    """Restart service ``name`` (see the module docstring). Raises ``RepairFailed``."""
    cfg = ctx.config.services[name]
    if cfg.start is None:
        raise RepairFailed("the service has no start command")
    if cfg.start.systemd_unit or cfg.start.supervisor:
        await restart_managed(ctx, name, step)
        return
    procs = await find_processes(ctx, name)
    if procs:
        step(f"found {len(procs)} processes", processes=[describe(p) for p in procs])
        await ctx.keep_evidence(name, procs, step)
        await stop_service_processes(ctx, name, procs, step)
        step("all processes stopped")
    else:
        step("no processes running")
    await stop_leftovers(ctx, name, step)
    await start_if_needed(ctx, name, step)


async def stop_leftovers(ctx: ActionContext, name: str, step: StepLog) -> None:
    """Stop what is left of the service's previous incarnation: its children and session
    members that outlived its main process (as systemd's control-group kill does), each
    alone, gracefully. PostgreSQL backends start sessions of their own, so the process
    group alone would not find them: the receiver keeps each service's family (see
    :class:`FamilyTracker`)."""
    if ctx.family is None or not ctx.config.services[name].stop.leftovers:
        return
    left = await asyncio.to_thread(ctx.family.leftovers, name)
    if not left:
        return
    step(f"stopping {len(left)} leftover processes of the previous incarnation",
         processes=[describe(p) for p in left])
    await stop_service_processes(ctx, name, left, step, whole_groups=False)
    ctx.family.forget(name)


async def start_if_needed(ctx: ActionContext, name: str, step: StepLog) -> None:
    """Start the service unless it already runs its min processes (never a second copy), then verify
    (its heartbeats too: each must be fed after this point, by the new incarnation)."""
    cfg = ctx.config.services[name]
    assert cfg.start is not None
    since = time.time()
    ctx.reaper.reap()
    running = await find_processes(ctx, name)
    child = None
    if len(running) >= max(cfg.processes.min, 1):
        step(f"{len(running)} processes already running (started by someone else); not starting a second copy",
             processes=[describe(p) for p in running])
    elif ctx.may_start is not None and not await ctx.may_start(name):
        raise RepairFailed("paused by an operator during the repair: not started")
    elif cfg.start.argv is None:
        await restart_managed(ctx, name, step)
        return
    else:
        with failing_repair():
            child = await asyncio.to_thread(start_service, ctx.config, name)
        ctx.reaper.add(child, name)
        step(f"started {' '.join(cfg.start.argv)} as pid {child.pid}")
    await verify(ctx, name, cfg.remediation.verify_timeout, step, child, heartbeats_since=since,
                 started_after=since if child is not None else None)


async def restart_managed(ctx: ActionContext, name: str, step: StepLog) -> None:
    """``systemctl restart UNIT`` or ``supervisorctl restart PROGRAM``, then verify (its
    heartbeats too: each must be fed after the command was run)."""
    cfg = ctx.config.services[name]
    assert cfg.start is not None
    procs = await find_processes(ctx, name)
    if procs:
        await ctx.keep_evidence(name, procs, step)
    if cfg.start.systemd_unit:
        argv = ["systemctl", "restart", cfg.start.systemd_unit]
    else:
        sup = cfg.start.supervisor
        assert sup is not None
        argv = ["supervisorctl", *(["-c", str(ctx.config.resolve(sup.config))] if sup.config else []),
                "restart", sup.program]
    since = time.time()
    with failing_repair():
        status, output = await run_command(argv, cfg.start.timeout)
    step(f"{' '.join(argv)}: exit status {status}", output=output)
    if status != 0 or "ERROR" in output:
        raise RepairFailed(f"{argv[0]} failed (exit status {status}): {output.strip()[-200:]}")
    await verify(ctx, name, cfg.remediation.verify_timeout, step, heartbeats_since=since, started_after=since)


async def stop_duplicates(ctx: ActionContext, name: str, step: StepLog) -> None:
    """Keep ``processes.max`` processes (the one its pidfile names first, then those
    holding the service's ports or ``match.port``, then the oldest), stop the others,
    each alone, gracefully; then verify."""
    cfg = ctx.config.services[name]
    procs = await find_processes(ctx, name)
    if len(procs) <= cfg.processes.max:
        step(f"{len(procs)} processes, max {cfg.processes.max}: nothing to stop")
        return
    ports = (*cfg.ports, cfg.match.port) if cfg.match.port else cfg.ports
    holders = await asyncio.to_thread(port_holders, ports, [p.pid for p in procs], ctx.reader.root) if ports else set()
    named = read_pidfile(cfg.match.pidfile) if cfg.match.pidfile else None
    main_pid = named[0] if named else 0
    ranked = keep_order(procs, main_pid, holders)
    keep, extra = ranked[:cfg.processes.max], ranked[cfg.processes.max:]
    step(f"keeping {[p.pid for p in keep]}, stopping {[p.pid for p in extra]}",
         processes=[describe(p) for p in procs])
    await ctx.keep_evidence(name, extra, step)
    await stop_service_processes(ctx, name, extra, step, whole_groups=False)
    await verify(ctx, name, cfg.remediation.verify_timeout, step)


async def free_port(ctx: ActionContext, name: str, step: StepLog) -> None:
    """Stop the process holding the service's port when it is not the service, then start the service."""
    cfg = ctx.config.services[name]
    own = await find_processes(ctx, name)
    freed = False
    for port in cfg.ports:
        status = await asyncio.to_thread(check_port, port, [p.pid for p in own], ctx.reader.root)
        if not status.conflict:
            step(f"port {port}: {'held by the service' if status.listening else 'free'}")
            continue
        if status.holder_pid in (0, 1, os.getpid()):
            raise RepairFailed(f"port {port} is held by pid {status.holder_pid} ({status.holder_comm}); "
                               "not stopping that")
        holder = ctx.reader.stat(status.holder_pid)
        if holder is None:
            step(f"port {port}: the holder {status.holder_pid} is already gone")
            continue
        step(f"port {port} is held by pid {holder.pid} ({holder.comm}), not {name}: stopping it",
             processes=[describe(holder)])
        await ctx.keep_evidence(name, [holder], step)
        await stop_service_processes(ctx, name, [holder], step, whole_groups=False)
        freed = True
    if freed or not own:
        await start_if_needed(ctx, name, step)


def _top_level(procs: list[ProcessInfo]) -> list[ProcessInfo]:
    pids = {p.pid for p in procs}
    return [p for p in procs if p.ppid not in pids]


async def send_declared_signal(ctx: ActionContext, name: str, step: StepLog) -> None:
    """The declared signal to the service's top processes (those whose parent is not
    part of the service: a master, not its workers), each alone."""
    cfg = ctx.config.services[name]
    assert cfg.remediation.signal is not None
    sig = signal.Signals[cfg.remediation.signal.signal]
    procs = _top_level(await find_processes(ctx, name))
    if not procs:
        raise RepairFailed("no process of the service runs")
    for line in await asyncio.to_thread(send_signal_each, ctx.reader, procs, sig):
        step(line)


ActionFunc = Callable[[ActionContext, str, StepLog], Awaitable[None]]
ACTIONS: dict[str, ActionFunc] = {
    "restart": restart, "stop_duplicates": stop_duplicates, "free_port": free_port, "signal": send_declared_signal,
}
