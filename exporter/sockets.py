"""Listening TCP sockets and the processes that hold them (Linux ``/proc``).

Formats are those of proc(5): ``/proc/net/tcp`` and ``/proc/net/tcp6`` list sockets,
one a line, with the local address as ``HEXADDR:HEXPORT`` (field 2), the state (field
4, ``0A`` is LISTEN) and the socket's inode (field 10); each ``/proc/PID/fd/N`` of a
socket is a link to ``socket:[INODE]``. Who holds a port is who has a descriptor of
an inode listening on it; several processes may (a pre-forking server's master and
workers, a process that passed the socket on).

All functions are blocking (``/proc`` reads): call them from a thread. A process that
is gone or whose descriptors cannot be read holds nothing, as far as they can tell.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PortStatus", "check_port", "check_ports", "holders", "listening_table", "port_holders", "socket_inodes"]

TCP_LISTEN = "0A"


def listening_table(proc_root: str = "/proc") -> dict[int, set[int]]:
    """``{port: socket inodes listening on it}`` for TCP (IPv4 and IPv6), from ``/proc/net/tcp{,6}``."""
    table: dict[int, set[int]] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc_root}/net/{name}", encoding="ascii") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == TCP_LISTEN:
                        table.setdefault(int(fields[1].rsplit(":", 1)[1], 16), set()).add(int(fields[9]))
        except OSError:
            continue
    return table


def socket_inodes(pid: int, proc_root: str = "/proc") -> set[int]:
    """Inodes of the sockets process ``pid`` has descriptors of (empty when it is gone
    or its ``fd/`` cannot be read)."""
    out = set()
    try:
        with os.scandir(f"{proc_root}/{pid}/fd") as it:
            for entry in it:
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    except OSError:
        pass
    return out


def holders(inodes: set[int], pids: Iterable[int], proc_root: str = "/proc") -> Iterator[tuple[int, set[int]]]:
    """``(pid, the inodes of ``inodes`` it holds)`` for each of ``pids`` that holds one,
    in the order given; lazily, so a caller that wants the first reads no further.
    The one search of the processes' descriptors for the holders of sockets."""
    if not inodes:
        return
    for pid in pids:
        held = socket_inodes(pid, proc_root) & inodes
        if held:
            yield pid, held


def port_holders(ports: Iterable[int], pids: Iterable[int], proc_root: str = "/proc",
                 table: Mapping[int, set[int]] | None = None) -> set[int]:
    """Pids among ``pids`` listening on any of ``ports``. ``table`` is
    :func:`listening_table`, when the caller has it."""
    table = listening_table(proc_root) if table is None else table
    listening = set().union(*(table.get(port, set()) for port in ports))
    return {pid for pid, _ in holders(listening, pids, proc_root)}


def _all_pids(proc_root: str) -> Iterator[int]:
    return (int(name) for name in os.listdir(proc_root) if name.isdigit())


def _comm(pid: int, proc_root: str) -> str:
    try:
        return Path(proc_root, str(pid), "comm").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class PortStatus:
    listening: bool
    conflict: bool
    """Something listens on the port, and it is not one of the service's processes."""
    holder_pid: int = 0
    """In a conflict: the first process found holding the port (0 when none could be read)."""
    holder_comm: str = ""


def check_ports(ports: Sequence[int], service_pids: Sequence[int], proc_root: str = "/proc",
                table: Mapping[int, set[int]] | None = None) -> dict[int, PortStatus]:
    """Who listens on each port: the service (fine), nobody, or someone else (a conflict).

    ``table`` is :func:`listening_table`, when the caller checks several services.
    The service's sockets are read only when something listens on one of its ports;
    the other processes' only in a conflict, until the holder is found.
    """
    table = listening_table(proc_root) if table is None else table
    out: dict[int, PortStatus] = {}
    owned: set[int] | None = None
    for port in ports:
        inodes = table.get(port, set())
        if not inodes:
            out[port] = PortStatus(False, False)
            continue
        if owned is None:
            owned = set().union(*(socket_inodes(pid, proc_root) for pid in service_pids))
        if inodes & owned:
            out[port] = PortStatus(True, False)
            continue
        found = next(holders(inodes, _all_pids(proc_root), proc_root), None)
        pid = found[0] if found else 0
        out[port] = PortStatus(True, True, pid, _comm(pid, proc_root) if pid else "")
    return out


def check_port(port: int, service_pids: Sequence[int], proc_root: str = "/proc") -> PortStatus:
    """:func:`check_ports` for one port."""
    return check_ports([port], service_pids, proc_root)[port]
