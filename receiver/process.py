"""Process control: signal a set of processes safely, wait until they are gone, start a
service as systemd would, stop processes gracefully, run a command with a deadline.

The receiver's repairs (:mod:`receiver.actions`, :mod:`receiver.repairs`), the demo
and the tests use it as a library, as supervisord's ``supervisor/process.py`` holds
what supervisord does to the processes it runs. Unlike supervisord, caretaker is not
the parent of most of what it stops, so every target is a :class:`ProcessInfo` from a
scan (pid *and* start time), and the rules are:

- A target is opened as a pidfd and checked to be the process that was scanned (same
  start time) before a signal goes out, so a reused pid is never hit.
- A signal goes to a process's whole group only when the process leads its group (as
  a service that caretaker started does, or a daemon); otherwise to the process alone,
  so a service started from someone's shell never takes that shell down. The
  caller's own process group is never signalled as a group.
- Nothing goes through a shell; argv comes from the config, never from an alert.

Failures that a caller reports (a program that cannot be started, processes that
survive SIGKILL, a command cut off by its deadline) raise :class:`ProcessError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from exporter.config import Config, ConfigError, Start, read_secret
from exporter.environment import minimal_environment
from exporter.procfs import ProcessInfo, ProcReader

__all__ = [
    "KILL_WAIT_SECONDS",
    "ChildReaper",
    "ProcessError",
    "Report",
    "describe",
    "launch_argv",
    "run_command",
    "send_signal",
    "send_signal_each",
    "service_environment",
    "start_problems",
    "start_service",
    "stop_gracefully",
    "wait_gone",
]

KILL_WAIT_SECONDS = 5.0
"""How long processes may take to disappear after SIGKILL (a process in uninterruptible
sleep may never do so)."""
POLL_SECONDS = 0.05
SERVICE_UMASK = 0o022
"""A started service's umask unless ``start.umask``: systemd's default for services,
whatever the receiver's own (its unit sets 0077 for its private files)."""
OUTPUT_TAIL = 4096
"""Bytes of a command's output that :func:`run_command` returns (the end of it)."""


class ProcessError(Exception):
    """A program could not be started, processes survived SIGKILL, or a command did not
    finish in time; the message says which, for a person."""


class Report(Protocol):
    """Where a step is told: a message and data (the receiver's audit trail, a log)."""

    def __call__(self, message: str, /, **data: Any) -> None: ...


def _ignore(message: str, /, **data: Any) -> None:
    return None


def describe(p: ProcessInfo) -> dict[str, Any]:
    """A process as a step of the audit trail shows it (JSON-able; age in seconds)."""
    return {"pid": p.pid, "pgid": p.pgid, "comm": p.comm, "state": p.state,
            "rss_bytes": p.rss_bytes, "cpu_seconds": p.cpu_seconds,
            "age_seconds": round(time.time() - p.start_time_seconds, 3)}


# --- signals -------------------------------------------------------------------------------

def _same_process(reader: ProcReader, p: ProcessInfo) -> bool:
    now = reader.stat(p.pid)
    return now is not None and now.start_ticks == p.start_ticks


def send_signal(reader: ProcReader, processes: list[ProcessInfo], sig: signal.Signals,
                whole_groups: bool = True) -> list[str]:
    """Signal each process, or the whole group it leads when ``whole_groups``.

    Each target is opened as a pidfd and checked to be the process that was scanned
    (same start time) before the signal goes out, so a reused pid is never hit. Our
    own process group is never signalled as a group. Blocking but quick; a process
    that is already gone is skipped. Returns what was done, one line each
    (``"SIGTERM to process group 123 (redis-server)"``).
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
    """Wait up to ``timeout`` seconds until none of ``processes`` runs (zombies count as
    gone; a reused pid is not the process); returns those left."""
    deadline = time.monotonic() + timeout
    left = processes
    while True:
        left = [p for p in left if _same_process(reader, p)]
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(POLL_SECONDS)


async def stop_gracefully(reader: ProcReader, processes: list[ProcessInfo], stop_signal: signal.Signals,
                          grace_period: float, report: Report = _ignore, whole_groups: bool = True) -> None:
    """Stop ``processes`` as systemd stops a unit: ``stop_signal``, then SIGCONT when
    one is stopped (state T: a frozen process acts on its signal only once continued),
    up to ``grace_period`` seconds, then SIGKILL for what is left.

    ``whole_groups=False`` signals each pid alone (to stop some processes of a service
    while keeping others of the same group). Each signal sent is reported, one line
    each. Raises :class:`ProcessError` if some survive SIGKILL for
    :data:`KILL_WAIT_SECONDS` (uninterruptible sleep).
    """
    send = send_signal if whole_groups else send_signal_each
    for line in await asyncio.to_thread(send, reader, processes, stop_signal):
        report(line)
    if stop_signal != signal.SIGKILL and any(p.state in "Tt" for p in processes):
        for line in await asyncio.to_thread(send, reader, processes, signal.SIGCONT):
            report(line)
    left = await wait_gone(reader, processes, grace_period)
    if not left:
        return
    report(f"{len(left)} processes still there after {grace_period:g}s grace period",
           processes=[describe(p) for p in left])
    for line in await asyncio.to_thread(send, reader, left, signal.SIGKILL):
        report(line)
    left = await wait_gone(reader, left, KILL_WAIT_SECONDS)
    if left:
        raise ProcessError(f"processes {[p.pid for p in left]} survived SIGKILL "
                           f"(states {[p.state for p in left]}; uninterruptible sleep?)")


# --- starting a service as systemd would -------------------------------------------------------

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
    clean environment (see :class:`~exporter.config.Start`). Blocking but quick.

    The caller must reap the returned child (see :class:`ChildReaper`). Raises
    :class:`ProcessError` if it cannot be started (missing program, bad cwd, unreadable
    secret...).
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
        raise ProcessError(f"cannot start {program!r}: {err}") from err
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
        raise ProcessError(f"cannot start {program!r}: {err}") from err
    return child


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


# --- commands ----------------------------------------------------------------------------------

async def run_command(argv: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
    """Run argv (no shell) in its own process group, with a minimal environment (PATH,
    LANG: never the receiver's credentials); ``(exit status, last OUTPUT_TAIL characters
    of stdout and stderr)``.

    Raises :class:`ProcessError` when the program cannot be run, and when it does not
    finish within ``timeout`` seconds (its whole group is killed first). Cancelled, it
    kills the group too, then re-raises.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=cwd, env=minimal_environment())
    except OSError as err:
        raise ProcessError(f"cannot run {argv[0]!r}: {err.strerror}") from err
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise ProcessError(f"{argv[0]} did not finish within {timeout:g}s; killed") from None
    except asyncio.CancelledError:  # the repair's deadline, or shutdown: nothing of it is left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        raise
    text = out.decode("utf-8", "replace")
    return proc.returncode or 0, text[-OUTPUT_TAIL:]
