"""Repairs. ``restart``: stop gracefully, start detached, verify.

The restart state machine, as a careful operator would do it::

    find processes -> send stop signal (default SIGTERM), then SIGCONT (a stopped,
      frozen process can then act on it, as systemd does) -> wait grace_period
      -> SIGKILL whatever is left -> wait until gone
      -> stop the leftovers of that incarnation (children and session members that
         outlived it, e.g. PostgreSQL backends of a SIGKILLed postmaster), gracefully
      -> if the service already runs its min processes: do not start a second copy
      -> start argv detached (own session; stdout/stderr to log_file)
      -> verify: processes within [min, max] and every probe passes, within verify_timeout
         (a start that exits at once fails at once, with the tail of its log)

Signals go to a process's whole group only when the process leads its group (as a
service that caretaker started does, or a daemon); otherwise to the process alone,
so a service started from someone's shell never takes that shell down. Each target
is checked to be the same process as scanned (pid and start time) through a pidfd
before it is signalled, so a reused pid is never hit. Nothing here goes through a
shell; argv comes from the config only, never from an alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from exporter.config import Config, ConfigError, ServiceConfig, Start, read_secret
from exporter.environment import minimal_environment
from exporter.files import check_port, listening_table, socket_inodes
from exporter.probes import ProbeContext, run_probes
from exporter.procfs import ProcessInfo, ProcReader, read_pidfile, scan_services

from .family import FamilyTracker

__all__ = ["ACTIONS", "ActionContext", "ChildReaper", "RepairFailed", "StepLog", "restart", "run_command"]

log = logging.getLogger(__name__)

KILL_WAIT_SECONDS = 5.0
POLL_SECONDS = 0.05
VERIFY_POLL_SECONDS = 0.1
SERVICE_UMASK = 0o022
"""A started service's umask unless ``start.umask``: systemd's default for services,
whatever the receiver's own (its unit sets 0077 for its private files)."""
START_SETTLE_SECONDS = 0.3
"""How long a service the receiver just started must stay healthy to be verified."""
OUTPUT_TAIL = 4096
LOG_TAIL = 2048


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
    When added from a running event loop, each child is watched through a pidfd, so
    its exit is known (and reaped) at once and ``on_exit(name, child)`` is called: the
    receiver never has to rediscover a process it started.
    """

    def __init__(self, on_exit: Callable[[str, subprocess.Popen[bytes]], None] | None = None) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        self.on_exit = on_exit

    def add(self, child: subprocess.Popen[bytes], name: str = "") -> None:
        self.children.append(child)
        try:
            loop = asyncio.get_running_loop()
            pidfd = os.pidfd_open(child.pid)
        except (RuntimeError, OSError):
            return  # no loop, or already gone: reap() collects it

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            child.poll()
            self.reap()
            if self.on_exit is not None:
                self.on_exit(name, child)

        loop.add_reader(pidfd, exited)

    def reap(self) -> None:
        self.children = [c for c in self.children if c.poll() is None]


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


def _describe(p: ProcessInfo) -> dict[str, Any]:
    return {"pid": p.pid, "pgid": p.pgid, "comm": p.comm, "state": p.state,
            "rss_bytes": p.rss_bytes, "cpu_seconds": p.cpu_seconds,
            "age_seconds": round(time.time() - p.start_time_seconds, 3)}


def _same_process(reader: ProcReader, p: ProcessInfo) -> bool:
    now = reader.stat(p.pid)
    return now is not None and now.start_ticks == p.start_ticks


def send_signal(reader: ProcReader, processes: list[ProcessInfo], sig: signal.Signals,
                whole_groups: bool = True) -> list[str]:
    """Signal each process, or the whole group it leads when ``whole_groups``.

    Each target is opened as a pidfd and checked to be the process that was scanned
    (same start time) before the signal goes out, so a reused pid is never hit. Our
    own process group is never signalled as a group. Blocking but quick; a process
    that is already gone is skipped. Returns what was done, one line each.
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
            if whole_groups and p.pgid == p.pid and p.pgid != own_group:
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


def send_signal_each(reader: ProcReader, processes: list[ProcessInfo], sig: signal.Signals) -> list[str]:
    """Like :func:`send_signal`, but never to a whole process group."""
    return send_signal(reader, processes, sig, whole_groups=False)


async def wait_gone(reader: ProcReader, processes: list[ProcessInfo], timeout: float) -> list[ProcessInfo]:
    """Wait until none of ``processes`` runs (zombies count as gone); returns those left."""
    deadline = time.monotonic() + timeout
    left = processes
    while True:
        left = [p for p in left if _same_process(reader, p)]
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(POLL_SECONDS)


def _account(cfg: Start) -> tuple[pwd.struct_passwd | None, int | None]:
    """The user and group a service runs as (``None``: the receiver's own)."""
    user = None
    if cfg.user is not None:
        user = pwd.getpwuid(cfg.user) if isinstance(cfg.user, int) else pwd.getpwnam(cfg.user)
    gid = None
    if cfg.group is not None:
        gid = cfg.group if isinstance(cfg.group, int) else grp.getgrnam(cfg.group).gr_gid
    elif user is not None:
        gid = user.pw_gid
    return user, gid


def start_problems(config: Config) -> list[str]:
    """Why the receiver could not start some services as configured: a user or group it
    cannot become (it is not root, and they are not its own). One ``place: message`` each."""
    problems = []
    euid, egid = os.geteuid(), os.getegid()
    for name, cfg in config.services.items():
        start = cfg.start
        if start is None or start.argv is None or euid == 0:
            continue
        user, gid = _account(start)
        if user is not None and user.pw_uid != euid:
            problems.append(f"services.{name}.start.user: the receiver runs as uid {euid}, not root, and cannot "
                            f"start processes as {user.pw_name} (uid {user.pw_uid})")
        if gid is not None and gid != egid and gid not in os.getgroups():
            problems.append(f"services.{name}.start.group: the receiver (gid {egid}) cannot start processes "
                            f"with gid {gid}")
    return problems


def service_environment(config: Config, name: str) -> dict[str, str]:
    """What a started service gets (see :class:`~exporter.config.Start`). Raises
    ``ConfigError`` when a secret in ``start.env`` cannot be read."""
    start = config.services[name].start
    assert start is not None
    user, _ = _account(start)
    account = {"HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name} if user is not None else {}
    given = {key: value if isinstance(value, str) else read_secret(value, config.base_dir)
             for key, value in start.env.items()}
    return minimal_environment(start.inherit_env, {**account, **given})


def launch_argv(start: Start) -> list[str]:
    """argv, wrapped so that the limits are set, then the privileges dropped, in the
    child before it runs the service: ``prlimit ... -- setpriv ... -- argv``. Both are
    util-linux programs that exec what follows (same pid); ``preexec_fn`` would not be
    safe in the receiver, which runs threads, and Popen's own ``user=`` drops privileges
    before a wrapper could raise a hard limit."""
    assert start.argv is not None
    argv = list(start.argv)
    user, gid = _account(start)
    if user is not None or gid is not None:
        euid, egid = os.geteuid(), os.getegid()
        uid = user.pw_uid if user is not None else euid
        target_gid = gid if gid is not None else egid
        if (uid, target_gid) != (euid, egid) or euid == 0:
            groups = ["--init-groups"] if user is not None else ["--clear-groups"]
            argv = ["setpriv", f"--reuid={uid}", f"--regid={target_gid}", *groups, "--", *argv]
    limits = [f"--{key}={value}:{value}" for key, value in start.limits.model_dump().items() if value is not None]
    if limits:
        argv = ["prlimit", *limits, "--", *argv]
    return argv


def start_service(config: Config, name: str) -> subprocess.Popen[bytes]:
    """Start the service detached: own session, stdin from /dev/null, output to its log
    file (created for the service's user), as its user, with its limits, umask and a
    clean environment (see :class:`~exporter.config.Start`).

    The caller must reap the returned child (see :class:`ChildReaper`). Raises
    ``RepairFailed`` if it cannot be started (missing program, bad cwd, unreadable secret...).
    """
    cfg = config.services[name]
    assert cfg.start is not None and cfg.start.argv is not None, "start_service needs start.argv"
    start = cfg.start
    program = cfg.start.argv[0]
    cwd = config.resolve(start.cwd) if start.cwd else config.base_dir
    log_path = config.resolve(start.log_file) if start.log_file else None
    try:
        env = service_environment(config, name)
    except ConfigError as err:
        raise RepairFailed(f"cannot start {program!r}: {err}") from err
    user, gid = _account(start)
    try:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            created = not log_path.exists()
            out: Any = open(log_path, "ab")
            if created and (user is not None or gid is not None) and os.geteuid() == 0:
                os.chown(log_path, user.pw_uid if user is not None else -1, gid if gid is not None else -1)
        else:
            out = subprocess.DEVNULL
        try:
            child = subprocess.Popen(launch_argv(start), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                     umask=int(start.umask, 8) if start.umask else SERVICE_UMASK)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
    except OSError as err:
        raise RepairFailed(f"cannot start {program!r}: {err}") from err
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
    healthy_since: float | None = None
    while True:
        procs = await find_processes(ctx, name)
        n = len(procs)
        if not cfg.processes.min <= n <= cfg.processes.max:
            problem = f"{n} processes, expected {cfg.processes.min}..{cfg.processes.max}"
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
                # A process that dies right after its start (a port in use, a bad config)
                # is often still there at the first look: a fresh start must stay healthy
                # a moment, as supervisord's startsecs asks.
                if child is None or now - healthy_since >= START_SETTLE_SECONDS or timeout <= 0:
                    step(f"verified: {n} processes, probes passing: {', '.join(results) or 'none configured'}")
                    return
                await asyncio.sleep(VERIFY_POLL_SECONDS)
                continue
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


async def stop_gracefully(ctx: ActionContext, name: str, procs: list[ProcessInfo], step: StepLog,
                          whole_groups: bool = True) -> None:
    """Stop signal, grace period, SIGKILL for what is left; ``RepairFailed`` if some survive.

    ``whole_groups=False`` signals each pid alone (for stopping some processes of a
    service while keeping others of the same group).
    """
    cfg = ctx.config.services[name]
    stop_signal = signal.Signals[cfg.stop.signal]
    send = send_signal if whole_groups else send_signal_each
    for line in await asyncio.to_thread(send, ctx.reader, procs, stop_signal):
        step(line)
    if stop_signal != signal.SIGKILL and any(p.state in "Tt" for p in procs):
        # A stopped (frozen) process acts on its stop signal only once continued.
        for line in await asyncio.to_thread(send, ctx.reader, procs, signal.SIGCONT):
            step(line)
    left = await wait_gone(ctx.reader, procs, cfg.stop.grace_period)
    if left:
        step(f"{len(left)} processes still there after {cfg.stop.grace_period:g}s grace period",
             processes=[_describe(p) for p in left])
        for line in await asyncio.to_thread(send, ctx.reader, left, signal.SIGKILL):
            step(line)
        left = await wait_gone(ctx.reader, left, KILL_WAIT_SECONDS)
        if left:
            raise RepairFailed(f"processes {[p.pid for p in left]} survived SIGKILL "
                               f"(states {[p.state for p in left]}; uninterruptible sleep?)")


async def run_command(argv: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
    """Run argv (no shell) in its own process group, with a minimal environment (PATH,
    LANG: never the receiver's credentials); ``(status, output tail)``.

    On timeout the whole group is killed and ``RepairFailed`` is raised.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=cwd, env=minimal_environment())
    except OSError as err:
        raise RepairFailed(f"cannot run {argv[0]!r}: {err.strerror}") from err
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise RepairFailed(f"{argv[0]} did not finish within {timeout:g}s; killed") from None
    except asyncio.CancelledError:  # the repair's deadline, or shutdown: nothing of it is left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        raise
    text = out.decode("utf-8", "replace")
    return proc.returncode or 0, text[-OUTPUT_TAIL:]


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
        step(f"found {len(procs)} processes", processes=[_describe(p) for p in procs])
        await ctx.keep_evidence(name, procs, step)
        await stop_gracefully(ctx, name, procs, step)
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
         processes=[_describe(p) for p in left])
    await stop_gracefully(ctx, name, left, step, whole_groups=False)
    ctx.family.forget(name)


async def start_if_needed(ctx: ActionContext, name: str, step: StepLog) -> None:
    """Start the service unless it already runs its min processes (never a second copy), then verify."""
    cfg = ctx.config.services[name]
    assert cfg.start is not None
    ctx.reaper.reap()
    running = await find_processes(ctx, name)
    child = None
    if len(running) >= max(cfg.processes.min, 1):
        step(f"{len(running)} processes already running (started by someone else); not starting a second copy",
             processes=[_describe(p) for p in running])
    elif ctx.may_start is not None and not await ctx.may_start(name):
        raise RepairFailed("paused by an operator during the repair: not started")
    elif cfg.start.argv is None:
        await restart_managed(ctx, name, step)
        return
    else:
        child = await asyncio.to_thread(start_service, ctx.config, name)
        ctx.reaper.add(child, name)
        step(f"started {' '.join(cfg.start.argv)} as pid {child.pid}")
    await verify(ctx, name, cfg.remediation.verify_timeout, step, child)


async def restart_managed(ctx: ActionContext, name: str, step: StepLog) -> None:
    """``systemctl restart UNIT`` or ``supervisorctl restart PROGRAM``, then verify."""
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
    status, output = await run_command(argv, cfg.start.timeout)
    step(f"{' '.join(argv)}: exit status {status}", output=output)
    if status != 0 or "ERROR" in output:
        raise RepairFailed(f"{argv[0]} failed (exit status {status}): {output.strip()[-200:]}")
    await verify(ctx, name, cfg.remediation.verify_timeout, step)


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
    holders = await asyncio.to_thread(_port_holders, ctx.reader.root, ports, procs) if ports else set()
    named = read_pidfile(cfg.match.pidfile) if cfg.match.pidfile else None
    main_pid = named[0] if named else 0
    ranked = sorted(procs, key=lambda p: (p.pid != main_pid, p.pid not in holders, p.start_ticks, p.pid))
    keep, extra = ranked[:cfg.processes.max], ranked[cfg.processes.max:]
    step(f"keeping {[p.pid for p in keep]}, stopping {[p.pid for p in extra]}",
         processes=[_describe(p) for p in procs])
    await ctx.keep_evidence(name, extra, step)
    await stop_gracefully(ctx, name, extra, step, whole_groups=False)
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
             processes=[_describe(holder)])
        await ctx.keep_evidence(name, [holder], step)
        await stop_gracefully(ctx, name, [holder], step, whole_groups=False)
        freed = True
    if freed or not own:
        await start_if_needed(ctx, name, step)


def _port_holders(proc_root: str, ports: tuple[int, ...], procs: list[ProcessInfo]) -> set[int]:
    """Pids among ``procs`` listening on any of ``ports`` (blocking: one read of each file)."""
    table = listening_table(proc_root)
    listening = set().union(*(table.get(port, set()) for port in ports))
    return {p.pid for p in procs if listening & socket_inodes(p.pid, proc_root)} if listening else set()


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
