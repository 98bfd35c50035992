"""Process discovery and accounting from ``/proc`` (Linux).

Formats are those of proc(5): ``/proc/PID/stat`` (fields after the parenthesised
``comm``), ``/proc/PID/cmdline`` (NUL-separated argv), ``/proc/PID/exe`` (a link),
``/proc/PID/fd/`` (one entry per open descriptor) and ``btime`` in ``/proc/stat``.

A process is identified by ``(pid, start_ticks)``: a pid can be reused, its start
time cannot. Every fact reported about a service's process (comm, cmdline, CPU, RSS,
fds) is read in the scan that reports it. Which *other* processes a scan may skip
reading, and when they are read again, is :class:`ProcessTable`'s business (see its
docstring); :func:`scan_services` reads everything. Processes that vanish between
listing and reading are skipped silently: that is normal, not an error. Kernel threads,
zombies and the caller's excluded pids never match a service.

A service is found by regexes on comm / exe / cmdline, or, without regexes, by its
pidfile and/or the TCP port it listens on (``/proc/net/tcp{,6}`` gives the listening
socket's inode; ``/proc/PID/fd`` links show who holds it).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .config import Match, ServiceConfig
from .sockets import holders, listening_table, port_holders, socket_inodes

__all__ = ["CpuAccountant", "Explained", "ProcReader", "ProcessInfo", "ProcessTable", "RuleMatch", "ServiceMatcher",
           "keep_order", "scan_services"]

_PF_KTHREAD = 0x00200000
_NOT_RUNNING = frozenset("ZXxK")
"""Zombie, dead, and (our own letter) kernel thread: never part of a service."""
_CMDLINE_MAX = 128 * 1024


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One process as seen in one scan. Times in seconds, sizes in bytes."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    comm: str
    state: str
    """One letter from proc(5): R running, S sleeping, D disk sleep, T stopped, Z zombie..."""
    start_ticks: int
    start_time_seconds: float
    """Unix time the process started."""
    cpu_seconds: float
    """User plus system CPU time of the process (not its waited-for children)."""
    rss_bytes: int
    num_threads: int
    cmdline: str = ""
    open_fds: int | None = None

    @property
    def key(self) -> tuple[int, int]:
        """``(pid, start_ticks)``: unique for the lifetime of the machine."""
        return (self.pid, self.start_ticks)


class ProcReader:
    """Reads process facts from a proc root (``/proc``, or a fixture tree in tests)."""

    def __init__(self, root: str | os.PathLike[str] = "/proc", clock_ticks: int | None = None,
                 page_size: int | None = None) -> None:
        self.root = os.fspath(root)
        self.clock_ticks = clock_ticks or os.sysconf("SC_CLK_TCK")
        self.page_size = page_size or os.sysconf("SC_PAGE_SIZE")
        self._boot_time: float | None = None

    def _read(self, path: str, limit: int = 65536) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            chunks = []
            size = 0
            while size < limit:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        except OSError:  # ESRCH: the process went away while we read
            return None
        finally:
            os.close(fd)

    @property
    def boot_time(self) -> float:
        """Unix time the machine booted (``btime`` of ``/proc/stat``)."""
        if self._boot_time is None:
            data = self._read(f"{self.root}/stat") or b""
            for line in data.splitlines():
                if line.startswith(b"btime "):
                    self._boot_time = float(line.split()[1])
                    break
            else:
                raise OSError(f"no btime in {self.root}/stat")
        return self._boot_time

    def pids(self) -> list[int]:
        """Pids of all processes (thread group leaders) now listed."""
        return [int(name) for name, _ in self.listing() if name.isdigit()]

    def listing(self) -> list[tuple[str, int]]:
        """``(name, inode)`` of every entry of the proc root, from one ``getdents`` pass.

        Names that are not digits (``self``, ``stat``...) are left in; callers skip them.
        The kernel gives each new process's ``/proc/PID`` a fresh inode number
        (``get_next_ino()``) and drops a dead process's dentries, so an unchanged
        ``(pid, inode)`` is the same process. 0 means "unknown" (never trusted).
        """
        with os.scandir(self.root) as it:
            return [(entry.name, entry.inode()) for entry in it]

    def uptime_ticks(self) -> float:
        """Clock ticks since boot now (the unit of ``start_ticks``)."""
        return time.clock_gettime(time.CLOCK_BOOTTIME) * self.clock_ticks

    def stat(self, pid: int) -> ProcessInfo | None:
        """Facts from ``/proc/PID/stat``; ``None`` if gone, a kernel thread or a zombie."""
        info = self.stat_any(pid)
        return None if info is None or info.state in _NOT_RUNNING else info

    def stat_any(self, pid: int) -> ProcessInfo | None:
        """Like :meth:`stat` but zombies and kernel threads are returned (state ``Z``/``K``)."""
        data = self._read(f"{self.root}/{pid}/stat", 4096)
        if not data:
            return None
        try:
            open_paren = data.index(b"(")
            close_paren = data.rindex(b")")
            comm = data[open_paren + 1:close_paren].decode("utf-8", "replace")
            f = data[close_paren + 2:].split()
            state = "K" if int(f[6]) & _PF_KTHREAD else f[0].decode()
            start_ticks = int(f[19])
            return ProcessInfo(
                pid=pid, ppid=int(f[1]), pgid=int(f[2]), sid=int(f[3]), comm=comm, state=state,
                start_ticks=start_ticks,
                start_time_seconds=self.boot_time + start_ticks / self.clock_ticks,
                cpu_seconds=(int(f[11]) + int(f[12])) / self.clock_ticks,
                rss_bytes=int(f[21]) * self.page_size,
                num_threads=int(f[17]),
            )
        except (ValueError, IndexError):
            return None

    def cmdline(self, pid: int) -> str | None:
        data = self._read(f"{self.root}/{pid}/cmdline", _CMDLINE_MAX)
        if data is None:
            return None
        return data.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")

    def exe(self, pid: int) -> str | None:
        try:
            return os.readlink(f"{self.root}/{pid}/exe")
        except OSError:
            return None

    def open_fds(self, pid: int) -> int | None:
        try:
            with os.scandir(f"{self.root}/{pid}/fd") as it:
                return sum(1 for _ in it)
        except OSError:
            return None


PIDFILE_SLACK_SECONDS = 1.0
"""A process named by a pidfile must have started at most this long after the file was
last written (start times are known to about a second: the boot time is whole seconds)."""


def read_pidfile(path: str) -> tuple[int, float] | None:
    """``(pid, mtime)`` from a pidfile whose first line is the pid (as nginx, Redis,
    PostgreSQL's ``postmaster.pid`` and ``start-stop-daemon`` write them), or ``None``
    when the file is missing, unreadable, or does not start with a pid above 1 (init is
    never a service's process)."""
    try:
        with open(path, "rb") as f:
            first = f.read(64).split(b"\n", 1)[0].strip()
            mtime = os.fstat(f.fileno()).st_mtime
    except OSError:
        return None
    return (int(first), mtime) if first.isdigit() and int(first) > 1 else None


@dataclass(frozen=True)
class ServiceMatcher:
    """Compiled ``match`` of one service; every given regex must ``search`` its field.
    Without regexes, the process must be the one the pidfile names and/or hold the
    listening socket of the port (both, when both are given)."""

    comm: re.Pattern[str] | None
    exe: re.Pattern[str] | None
    cmdline: re.Pattern[str] | None
    pidfile: str | None = None
    port: int | None = None

    @property
    def by_regex(self) -> bool:
        return self.comm is not None or self.exe is not None or self.cmdline is not None

    @classmethod
    def from_config(cls, match: Match) -> ServiceMatcher:
        def compile_(p: str | None) -> re.Pattern[str] | None:
            return re.compile(p) if p is not None else None
        return cls(compile_(match.comm), compile_(match.exe), compile_(match.cmdline), match.pidfile, match.port)


_Entry = tuple[int, int]
"""What a scan remembers of a process: ``(inode, read again at scan number)``."""


class ProcessTable:
    """Finds each service's processes, scan after scan, reading as little as it may.

    Each scan lists ``/proc`` with inode numbers (one ``getdents`` pass). A process is
    read again (stat, and cmdline/exe when a matcher needs them) when it is new or its
    ``(pid, inode)`` changed (pid reuse), when it belongs to a service (so CPU, RSS,
    fds and a changed title or exec are seen at once), when it is younger than
    ``young_seconds`` (fork->exec and setproctitle happen early in a process's life),
    and otherwise every ``recheck_scans`` scans, spread over the scans, so that a late
    exec into a service is still found. Only the identity is cached, never a fact:
    every process reported was read in this scan.

    Blocking (reads ``/proc``): call :meth:`scan` from a thread, not the event loop.
    """

    def __init__(self, reader: ProcReader, services: Mapping[str, ServiceConfig],
                 exclude_pids: Iterable[int] = (), with_fds: bool = True, young_seconds: float = 10.0,
                 recheck_scans: int = 64) -> None:
        self.reader = reader
        self.services = services
        self.matchers = {name: ServiceMatcher.from_config(cfg.match) for name, cfg in services.items()}
        self.excluded = frozenset(exclude_pids)
        self.with_fds = with_fds
        self.young_ticks = young_seconds * reader.clock_ticks
        self.recheck_scans = max(1, recheck_scans)
        self._pidfiles = {name: m.pidfile for name, m in self.matchers.items()
                          if not m.by_regex and m.pidfile is not None}
        self._ports = {name: m.port for name, m in self.matchers.items() if not m.by_regex and m.port is not None}
        self._unresolved: frozenset[int] = frozenset()
        """Listening sockets a full search found no (readable) holder of; not searched again."""
        self._cache: dict[str, _Entry] = {}
        self._scans = 0
        self.reads = 0
        """Processes read in the last scan (for benchmarks and tests)."""

    def _match(self, info: ProcessInfo, pinned: Mapping[str, tuple[int, float]],
               listening: Mapping[str, set[int]], found: set[int]) -> tuple[tuple[str, ...], str | None]:
        pid = info.pid
        cmdline: str | None = None
        exe: str | None = None
        exe_read = False
        sockets: set[int] | None = None
        names = []
        for name, m in self.matchers.items():
            if not m.by_regex:
                if m.pidfile is not None:
                    named = pinned.get(name)
                    # A process that started after the pidfile was written is not the
                    # one that wrote it: the pid was reused after the service died.
                    if named is None or named[0] != pid or \
                            info.start_time_seconds > named[1] + PIDFILE_SLACK_SECONDS:
                        continue
                if m.port is not None:
                    inodes = listening.get(name)
                    if not inodes:
                        continue
                    if sockets is None:
                        sockets = socket_inodes(pid, self.reader.root)
                    if not sockets & inodes:
                        continue
                    found.update(sockets & inodes)
                names.append(name)
                continue
            if m.comm is not None and not m.comm.search(info.comm):
                continue
            if m.cmdline is not None:
                if cmdline is None:
                    cmdline = self.reader.cmdline(pid)
                    if cmdline is None:
                        return (), None  # gone
                if not m.cmdline.search(cmdline):
                    continue
            if m.exe is not None:
                if not exe_read:
                    exe, exe_read = self.reader.exe(pid), True
                if exe is None or not m.exe.search(exe):
                    continue
            names.append(name)
        return tuple(names), cmdline

    def scan(self) -> dict[str, list[ProcessInfo]]:
        """Processes of each service, oldest first; every service is a key, maybe ``[]``."""
        self._scans += 1
        scan_no = self._scans
        reader = self.reader
        old = self._cache
        cache: dict[str, _Entry] = {}
        result: dict[str, list[ProcessInfo]] = {name: [] for name in self.services}
        young_since = reader.uptime_ticks() - self.young_ticks
        # Pidfiles are read every scan, and the processes they name are read even when
        # remembered: a pidfile may come to name an old process (a restart by hand).
        pinned = {name: named_pid for name, path in self._pidfiles.items()
                  if (named_pid := read_pidfile(path)) is not None}
        named = {str(pid) for pid, _ in pinned.values()}
        # Port-selected services: the sockets listening on their ports now. Their holders
        # are matched (so read) every scan; new processes are read anyway; a socket no
        # process read in this scan holds sends one search through the others, below.
        listening: dict[str, set[int]] = {}
        if self._ports:
            table = listening_table(reader.root)
            listening = {name: table.get(port, set()) for name, port in self._ports.items()}
        held: set[int] = set()
        skipped: list[str] = []
        reads = 0
        for name, inode in reader.listing():
            entry = old.get(name)
            if entry is not None and scan_no < entry[1] and entry[0] == inode and inode and name not in named:
                cache[name] = entry  # same process, nothing of it can have changed that we use
                if listening:
                    skipped.append(name)
                continue
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in self.excluded:
                continue
            reads += 1
            info = reader.stat_any(pid)
            if info is None:
                continue  # gone between listing and reading
            services: tuple[str, ...] = ()
            cmdline = None
            if info.state not in _NOT_RUNNING:
                services, cmdline = self._match(info, pinned, listening, held)
            if services or info.start_ticks > young_since:
                recheck = scan_no + 1
            else:
                recheck = scan_no + self.recheck_scans + zlib.crc32(name.encode()) % self.recheck_scans
            cache[name] = (inode, recheck)
            if services:
                self._report(info, cmdline, services, result)
        wanted = set().union(*listening.values()) - held if listening else set()
        if wanted and not wanted <= self._unresolved:
            reads += self._search_holders(skipped, wanted, pinned, listening, cache, scan_no, result)
        self._cache = cache
        self.reads = reads
        for procs in result.values():
            procs.sort(key=lambda p: (p.start_ticks, p.pid))
        return result


    def _report(self, info: ProcessInfo, cmdline: str | None, services: tuple[str, ...],
                result: dict[str, list[ProcessInfo]]) -> None:
        """Add a matched process, with its cmdline and fds read now, to its services."""
        full = dataclasses.replace(
            info, cmdline=cmdline if cmdline is not None else (self.reader.cmdline(info.pid) or ""),
            open_fds=self.reader.open_fds(info.pid) if self.with_fds else None)
        for service in services:
            result[service].append(full)

    def _search_holders(self, names: list[str], wanted: set[int], pinned: Mapping[str, tuple[int, float]],
                        listening: Mapping[str, set[int]], cache: dict[str, _Entry], scan_no: int,
                        result: dict[str, list[ProcessInfo]]) -> int:
        """Look through the fds of the processes this scan skipped for the holders of
        listening sockets no read process held (an old process that bound the port late).
        Returns how many processes were read."""
        reads = 0
        found: set[int] = set()
        pids = (pid for pid in map(int, names) if pid not in self.excluded)
        for pid, _ in holders(wanted, pids, self.reader.root):
            name = str(pid)
            reads += 1
            info = self.reader.stat_any(pid)
            if info is None or info.state in _NOT_RUNNING:
                continue
            services, cmdline = self._match(info, pinned, listening, found)
            if not services:
                continue
            cache[name] = (cache[name][0], scan_no + 1)
            self._report(info, cmdline, services, result)
        self._unresolved = frozenset(wanted - found)
        return reads


def scan_services(reader: ProcReader, services: Mapping[str, ServiceConfig],
                  exclude_pids: Iterable[int] = (), with_fds: bool = True) -> dict[str, list[ProcessInfo]]:
    """One scan with nothing remembered (see :class:`ProcessTable`); every process is read."""
    return ProcessTable(reader, services, exclude_pids, with_fds).scan()


def keep_order(procs: Iterable[ProcessInfo], pidfile_pid: int, port_holders: set[int]) -> list[ProcessInfo]:
    """A service's processes in the order ``stop_duplicates`` keeps them: the one its
    pidfile names first, then those holding its ports, then the oldest."""
    return sorted(procs, key=lambda p: (p.pid != pidfile_pid, p.pid not in port_holders, p.start_ticks, p.pid))


# --- why a process is a service's -------------------------------------------------------------

START_WRAPPERS = frozenset({"prlimit", "setpriv"})
"""The programs the receiver starts a service through (``prlimit -- setpriv -- argv``):
each execs what follows at once, with the same pid."""


@dataclass(frozen=True)
class RuleMatch:
    """One rule of a service's ``match`` that a process meets."""

    rule: str
    """``comm``, ``exe`` or ``cmdline`` (a regex), ``pidfile`` or ``port``."""
    pattern: str
    """The regex, the pidfile's path, or the port."""
    matched: str = ""
    """What the regex matched (``re.search``), for a regex rule."""
    span: tuple[int, int] | None = None
    """Where in the field it matched, ``[start, end)`` characters."""
    selects: bool = True
    """False for a pidfile or port beside regexes: it does not select the process, it
    only makes ``stop_duplicates`` keep it first."""

    def __str__(self) -> str:
        if self.rule in ("comm", "exe", "cmdline"):
            where = f" at {self.span[0]}-{self.span[1]}" if self.span and self.rule != "comm" else ""
            return f"{self.rule}=~'{self.pattern}' matched '{self.matched}'{where}"
        what = f"named by pidfile {self.pattern}" if self.rule == "pidfile" else f"holds port {self.pattern}"
        return what if self.selects else f"{what} (kept first by stop_duplicates)"


@dataclass(frozen=True)
class Explained:
    """A process of a service, with why it is the service's."""

    process: ProcessInfo
    exe: str | None
    """``/proc/PID/exe`` read now; None when it cannot be read (another user's process)."""
    rules: tuple[RuleMatch, ...]
    hints: tuple[str, ...] = ()
    """What looks wrong about the match, for a person (an unrelated program matched by
    its command line, the receiver's start wrapper)."""


def _regex_rule(rule: str, pattern: re.Pattern[str] | None, text: str | None) -> list[RuleMatch]:
    found = pattern.search(text) if pattern is not None and text is not None else None
    return [RuleMatch(rule, pattern.pattern, found.group(), found.span())] if pattern and found else []


def _program(cfg: ServiceConfig, procs: Sequence[ProcessInfo]) -> str:
    """The comm the service's processes should have: the one of the program it is started
    with, else the one most of its processes have (``""``: unknown)."""
    if cfg.start is not None and cfg.start.argv:
        return posixpath.basename(cfg.start.argv[0])[:15]
    comms = [p.comm for p in procs]
    common = max(set(comms), key=comms.count, default="")
    return common if comms.count(common) * 2 > len(comms) else ""


def _hints(matcher: ServiceMatcher, p: ProcessInfo, exe: str | None, program: str) -> tuple[str, ...]:
    if exe is not None and posixpath.basename(exe) in START_WRAPPERS:
        return (f"{posixpath.basename(exe)} is the receiver's start wrapper: it execs the service at once with "
                "the same pid; the cmdline matched for those microseconds",)
    cmdline_only = matcher.cmdline is not None and matcher.comm is None and matcher.exe is None
    if cmdline_only and program and not (p.comm.startswith(program) or program.startswith(p.comm)):
        return (f"comm {p.comm!r} is not the service's program ({program}): only the cmdline regex matched it. "
                "Another program that mentions the name (an editor, a script, a grep)? restart and stop_duplicates "
                "would stop it too: add comm or exe to match, or anchor the regex",)
    return ()


def explain(table: ProcessTable, found: Mapping[str, Sequence[ProcessInfo]]) -> dict[str, list[Explained]]:
    """Why each process of ``found`` (what ``table.scan()`` returned) is its service's:
    the rules of the service's ``match`` it meets, read now (a process that changed since
    the scan may meet fewer), and hints (see :class:`Explained`). Blocking: reads
    ``/proc``, the pidfiles and the listening sockets."""
    reader = table.reader
    sockets = listening_table(reader.root) if any(cfg.ports or cfg.match.port for cfg in table.services.values()) \
        else {}
    out: dict[str, list[Explained]] = {}
    for name, procs in found.items():
        cfg, matcher = table.services[name], table.matchers[name]
        named = read_pidfile(matcher.pidfile) if matcher.pidfile is not None else None
        ports = dict.fromkeys((*cfg.ports, matcher.port) if matcher.port is not None else cfg.ports)
        held = {port: port_holders((port,), [p.pid for p in procs], reader.root, sockets) for port in ports}
        program = _program(cfg, procs)
        out[name] = []
        for p in procs:
            exe = reader.exe(p.pid)
            rules = (_regex_rule("comm", matcher.comm, p.comm) + _regex_rule("exe", matcher.exe, exe)
                     + _regex_rule("cmdline", matcher.cmdline, p.cmdline))
            if matcher.pidfile is not None and named is not None and named[0] == p.pid:
                rules.append(RuleMatch("pidfile", matcher.pidfile, selects=not matcher.by_regex))
            rules += [RuleMatch("port", str(port), selects=not matcher.by_regex and port == matcher.port)
                      for port, pids in held.items() if p.pid in pids]
            out[name].append(Explained(p, exe, tuple(rules), _hints(matcher, p, exe, program)))
    return out


class CpuAccountant:
    """A per-service CPU seconds counter that never goes backwards.

    Each scan adds, per service, the CPU each of its processes used since it was last
    seen (all of it for a process seen for the first time). A process that exits takes
    only its unseen last moments with it; the total never drops.
    """

    def __init__(self) -> None:
        self._last: dict[str, dict[tuple[int, int], float]] = {}
        self._total: dict[str, float] = {}

    def update(self, service: str, processes: Iterable[ProcessInfo]) -> float:
        """Account one scan of ``service``; returns the new total in seconds."""
        last = self._last.get(service, {})
        total = self._total.get(service, 0.0)
        seen: dict[tuple[int, int], float] = {}
        for p in processes:
            seen[p.key] = p.cpu_seconds
            total += max(0.0, p.cpu_seconds - last.get(p.key, 0.0))
        self._last[service] = seen
        self._total[service] = total
        return total

    def total(self, service: str) -> float:
        return self._total.get(service, 0.0)
