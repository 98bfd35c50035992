"""Each service's family: its processes, their descendants and their session members.

When a service's main process dies, what it started may live on: PostgreSQL backends
(which call ``setsid()``, so neither the process group nor the session of the
postmaster finds them) still hold the shared memory and refuse a new postmaster;
nginx or gunicorn workers still hold the port. systemd stops such leftovers with the
unit's control group; caretaker has no control group, so the receiver remembers each
service's family while it lives, and stops what is left of it before a start.

Cost: one cached scan of the services' processes (:class:`ProcessTable`) and one
``/proc`` listing per ``receiver.track_interval``; a process's parent and session are
read once, when it is first seen (``(pid, /proc inode)`` identifies it).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping

from exporter.config import ServiceConfig
from exporter.procfs import ProcessInfo, ProcessTable, ProcReader

__all__ = ["FamilyTracker", "Member", "boot_id"]

Member = tuple[int, int]
"""``(pid, start_ticks)``: one process, unique for the machine's uptime."""


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """This boot's id: ``(pid, start_ticks)`` identify a process only within one boot."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class FamilyTracker:
    """Keeps ``families[service]``: the members of the service's current (or, once it
    died, last) incarnation. Blocking methods: call them from a thread."""

    def __init__(self, reader: ProcReader, services: Mapping[str, ServiceConfig],
                 families: Mapping[str, frozenset[Member]] | None = None) -> None:
        self.reader = reader
        self.table = ProcessTable(reader, services, exclude_pids=(os.getpid(),), with_fds=False)
        self.families: dict[str, frozenset[Member]] = dict(families or {})
        self.matched: dict[str, frozenset[Member]] = {}
        """Each service's own processes in the last scan: never another's leftovers."""
        self.protected = frozenset(_ancestors(reader, os.getpid()))
        """pid 1, the receiver and the processes it runs under: never leftovers."""
        self._known: dict[str, tuple[int, int, int, int]] = {}
        """``/proc`` entry name -> (inode, ppid, sid, start_ticks) as first read."""

    def scan(self) -> dict[str, frozenset[Member]]:
        """Look again; returns the families that changed (to be persisted)."""
        found = self.table.scan()
        known: dict[str, tuple[int, int, int, int]] = {}
        for name, inode in self.reader.listing():
            if not name.isdigit():
                continue
            entry = self._known.get(name)
            if entry is None or entry[0] != inode or not inode:
                info = self.reader.stat_any(int(name))
                if info is None:
                    continue
                entry = (inode, info.ppid, info.sid, info.start_ticks)
            known[name] = entry
        self._known = known
        children: dict[int, list[Member]] = defaultdict(list)
        sessions: dict[int, list[Member]] = defaultdict(list)
        for name, (_, ppid, sid, ticks) in known.items():
            children[ppid].append((int(name), ticks))
            sessions[sid].append((int(name), ticks))
        changed = {}
        self.matched = {service: frozenset((p.pid, p.start_ticks) for p in procs) for service, procs in found.items()}
        for service, procs in found.items():
            if not procs:
                continue  # keep the last incarnation's family: its leftovers are what a restart stops
            family = {(p.pid, p.start_ticks) for p in procs}
            todo = [p.pid for p in procs]
            for p in procs:
                if p.sid == p.pid:  # a session leader: its session is part of it
                    todo.extend(pid for pid, _ in sessions[p.pid])
                    family.update(sessions[p.pid])
            while todo:
                pid = todo.pop()
                for member in children.get(pid, ()):
                    if member not in family:
                        family.add(member)
                        todo.append(member[0])
            # Like a control group: a member stays while it runs (same pid and start time),
            # even when the process it came from died and another of the service lives on.
            family.update(m for m in self.families.get(service, ())
                          if (entry := known.get(str(m[0]))) is not None and entry[3] == m[1])
            frozen = frozenset(family)
            if frozen != self.families.get(service):
                self.families[service] = frozen
                changed[service] = frozen
        return changed

    def leftovers(self, service: str) -> list[ProcessInfo]:
        """Members of the service's family that still run (same pid and start time),
        read now; never pid 1, the receiver or what it runs under, nor a process that
        another service's matchers selected in the last scan."""
        others = frozenset().union(*(m for name, m in self.matched.items() if name != service))
        out = []
        for pid, ticks in sorted(self.families.get(service, ())):
            if pid in self.protected or (pid, ticks) in others:
                continue
            info = self.reader.stat(pid)
            if info is not None and info.start_ticks == ticks:
                out.append(info)
        return out

    def forget(self, service: str) -> None:
        """The incarnation is gone (stopped): its family is no longer of interest."""
        self.families.pop(service, None)


def _ancestors(reader: ProcReader, pid: int) -> list[int]:
    """``pid``, its parent, and so on up to pid 1 (inclusive)."""
    chain = [1]
    while pid > 1 and pid not in chain:
        chain.append(pid)
        info = reader.stat_any(pid)
        if info is None:
            break
        pid = info.ppid
    return chain
