"""The exporter's heartbeats, as the receiver reads them: the one place it does.

The exporter keeps the heartbeats apps feed in ``exporter.state_file`` (JSON, written
atomically, at most once per :data:`exporter.heartbeats.SAVE_INTERVAL` second; format
and reader in :func:`exporter.heartbeats.read_saved`). The receiver reads that file,
on the same host and clock:

- to confirm ``CaretakerHeartbeatMissing`` before acting (:func:`late`): a heartbeat is
  late when it was never fed, or not within its ``timeout`` plus :data:`SAVE_LAG` (a
  heartbeat fed a moment ago may not be in the file yet);
- to verify a restart (:func:`fed_since`): a service with heartbeats is back only when
  each of them has been fed after the restart began, by the new incarnation's work loop
  (the pid that fed it is one of the service's processes now, started after the
  restart began).

Both block (a small file read): call them from a thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from exporter.config import Config
from exporter.heartbeats import SAVE_INTERVAL, HeartbeatState, read_saved
from exporter.procfs import ProcessInfo, ProcReader

__all__ = ["SAVE_LAG", "HeartbeatStateUnreadable", "fed_since", "late", "read", "started_at"]

SAVE_LAG = 2 * SAVE_INTERVAL
"""Seconds a heartbeat may take to reach the state file: the exporter saves at most once
per ``SAVE_INTERVAL``, and its loop may be late by as much again on a busy machine.
Without it, a heartbeat fed every 0.2 s against a 2 s timeout looked 1.2 s old in the
file and, with the next feed a little late, "late": a healthy service restarted."""


class HeartbeatStateUnreadable(Exception):
    """The exporter's heartbeat state file is missing or cannot be read; the message names it."""


def read(config: Config) -> dict[str, HeartbeatState]:
    """The heartbeats in the exporter's state file, by name. Raises
    :class:`HeartbeatStateUnreadable` (missing, unreadable, not the exporter's format)."""
    path = config.resolve(config.exporter.state_file)
    try:
        return read_saved(path)
    except FileNotFoundError as err:
        raise HeartbeatStateUnreadable(f"the exporter's heartbeat state {path} does not exist (no heartbeat "
                                       "received yet, or the exporter runs with another config)") from err
    except (OSError, ValueError) as err:
        raise HeartbeatStateUnreadable(f"cannot read the exporter's heartbeat state {path}: {err}") from err


def late(config: Config, service: str, name: str | None, now: float) -> tuple[bool | None, str]:
    """Whether heartbeat ``name`` of ``service`` (any of them when ``None``) is late at
    ``now`` (Unix seconds): never fed, or last fed more than its timeout plus
    :data:`SAVE_LAG` ago; and what was seen in words. ``None`` when it cannot be told:
    no such heartbeat, or the state file cannot be read."""
    beats = [hb for hb in config.services[service].heartbeats if name is None or hb.name == name]
    if not beats:
        return None, "no such heartbeat"
    try:
        saved = read(config)
    except HeartbeatStateUnreadable as err:
        return None, str(err)
    overdue = []
    for hb in beats:
        last = saved[hb.name].last_seen if hb.name in saved else 0.0
        if not last or now - last > hb.timeout + SAVE_LAG:
            overdue.append(f"{hb.name} last seen {now - last:.0f}s ago" if last else f"{hb.name} never seen")
    return bool(overdue), "; ".join(overdue) or "heartbeats fresh"


ANCESTRY_DEPTH = 16
"""Parents walked up from a reporting process to find the service's process it belongs to."""


def started_at(info: ProcessInfo, clock_ticks: int) -> float:
    """Unix time ``info``'s process started, to the clock tick: ``/proc/PID/stat``'s start
    time counts ticks of ``CLOCK_BOOTTIME``, and ``btime`` (whole seconds) would be up to a
    second early, enough to take an old process for a new one or the reverse. The kernel
    truncates to a tick: the process started up to one tick later than this."""
    booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return booted + info.start_ticks / clock_ticks


def _started_since(info: ProcessInfo, clock_ticks: int, since: float) -> bool:
    """Whether the process started at or after ``since`` (Unix seconds), give or take the
    two ticks of truncation and of reading two clocks."""
    return started_at(info, clock_ticks) + 2 / clock_ticks >= since


def _of_the_service(pid: int, procs: Sequence[ProcessInfo], reader: ProcReader) -> ProcessInfo | None:
    """The process ``pid`` if it is one of ``procs`` or a descendant of one of them (a
    worker of a master the service matches); ``None`` otherwise."""
    found = {p.pid: p for p in procs}
    if pid in found:
        return found[pid]
    info = reader.stat(pid)
    here = info
    for _ in range(ANCESTRY_DEPTH):
        if here is None or here.ppid <= 1:
            return None
        if here.ppid in found:
            return info
        here = reader.stat(here.ppid)
    return None


def fed_since(config: Config, names: Iterable[str], since: float, procs: Sequence[ProcessInfo] | None = None,
              reader: ProcReader | None = None,
              started_after: float | None = None) -> tuple[dict[str, HeartbeatState], str]:
    """Which heartbeats of ``names`` were fed after ``since`` (Unix seconds) by the service
    as it runs now, and not reported failing after that: ``(their states by name, why the
    others are not, in words)``; the words are empty when all were.

    ``procs``: the service's processes now (``None``: who fed it is not checked). A
    heartbeat counts only if the process that fed it (the pid the exporter recorded, with
    its start time) is one of them or a descendant of one, and, with ``started_after``
    (Unix seconds: the receiver started a new incarnation then), started at or after it:
    the old process, draining after SIGTERM while ``supervisorctl restart`` or
    ``systemctl restart`` waits for it, may still beat after the restart began. A plain
    feed without a pid cannot be traced to a process: it counts when it came after the
    newest of ``procs`` started (and, with ``started_after``, that one started after it),
    so not while the old incarnation drained before the new one existed.
    """
    try:
        saved = read(config)
    except HeartbeatStateUnreadable as err:
        return {}, str(err)
    reader = reader or ProcReader()
    fresh, missing = {}, []
    for name in names:
        state = saved.get(name)
        if state is None or not state.last_seen:
            missing.append(f"heartbeat {name} never fed")
        elif state.last_seen <= since:
            missing.append(f"heartbeat {name} not fed since the restart began "
                           f"(last fed {since - state.last_seen:.1f}s before it)")
        elif state.last_failure > state.last_seen:
            missing.append(f"heartbeat {name} reported failing after the restart")
        elif procs is not None and (why := _not_from(name, state, procs, reader, started_after)):
            missing.append(why)
        else:
            fresh[name] = state
    return fresh, "; ".join(missing)


def _not_from(name: str, state: HeartbeatState, procs: Sequence[ProcessInfo], reader: ProcReader,
              started_after: float | None) -> str:
    """Why ``state`` was not fed by the service as it runs now; empty when it was."""
    ticks = reader.clock_ticks
    if not state.pid:
        new = [p for p in procs if started_after is None or _started_since(p, ticks, started_after)]
        newest = max((started_at(p, ticks) for p in new), default=None)
        if newest is None:
            return f"heartbeat {name} fed without a pid, and no process of the service started after the restart began"
        if state.last_seen < newest:
            return f"heartbeat {name} fed without a pid before the service's newest process started"
        return ""
    info = _of_the_service(state.pid, procs, reader)
    if info is None:
        return f"heartbeat {name} last fed by pid {state.pid}, not a process of the service now (the old incarnation?)"
    if state.pid_start_ticks and info.start_ticks != state.pid_start_ticks:
        return f"heartbeat {name} last fed by an earlier process with pid {state.pid}"
    if started_after is not None and not _started_since(info, ticks, started_after):
        return (f"heartbeat {name} last fed by pid {state.pid}, which started before the restart began "
                "(the old incarnation)")
    return ""
