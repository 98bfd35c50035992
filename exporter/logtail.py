"""Follow log files and count lines matching error patterns.

A :class:`LogFollower` keeps the file open and remembers its inode and offset:

- **First sight**: start at the end (old lines are history, not news). A file that
  appears later is new, and is read from its start.
- **Rotation by rename** (logrotate ``create``, or the app's own): the path now has
  another inode. The old file stays open and is drained for ``rotate_wait`` seconds,
  since the app may write to it until it reopens its log; the new file is read from 0.
- **Truncation** (logrotate ``copytruncate``): the file is shorter than our offset.
  What we had not read yet was copied to ``PATH.1`` (when logrotate did not compress
  it yet), so it is read from there, then the file from 0. Lines written between the
  copy and the truncation are lost by copytruncate itself (see logrotate(8)).
- **Missing / deleted**: nothing to read, no error; it is picked up when it appears.
- **Bounded**: at most ``read_limit`` bytes per :meth:`poll`; the rest waits.

Blocking (file I/O): call :meth:`LogFollower.poll` from a thread.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .config import LogWatch

__all__ = ["DEFAULT_PATTERNS", "LogFollower", "Pattern", "patterns_for"]

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
ROTATE_WAIT_SECONDS = 30.0

DEFAULT_PATTERNS: dict[str, tuple[str, str]] = {
    # name: (regex, severity). Each is searched in every line.
    "http_5xx": (r'"\s5\d\d\s|\bHTTP/\d(?:\.\d)?"?\s5\d\d\b', "error"),
    "python_traceback": (r"^Traceback \(most recent call last\):", "error"),
    "database_connection_error": (
        r"(?i)could not connect to (?:server|database)|connection to server .* failed|OperationalError|"
        r"FATAL:\s+(?:password authentication failed|too many connections|the database system is)", "error"),
    "permission_denied": (r"(?i)permission denied|\bEACCES\b", "error"),
    "out_of_memory": (r"\bMemoryError\b|(?i:out of memory)|oom-kill|Killed process \d+|Cannot allocate memory",
                      "critical"),
    "disk_full": (r"No space left on device|\bENOSPC\b", "critical"),
    "address_in_use": (r"(?i)address already in use|\bEADDRINUSE\b", "error"),
    "json_decode_error": (r"JSONDecodeError|Expecting value: line \d+ column \d+|Unexpected token .* in JSON", "error"),
    "redis_connection_error": (
        r"redis\.exceptions\.(?:ConnectionError|TimeoutError)|Error \d+ connecting to \S+:\d+|"
        r"Could not connect to Redis", "error"),
    "tls_certificate_error": (
        r"(?i)certificate verify failed|certificate has expired|x509: certificate|SSLCertVerificationError",
        "error"),
}
"""The classic failures of locally-run services, matched in any log."""


@dataclass(frozen=True)
class Pattern:
    name: str
    regex: re.Pattern[str]
    severity: str


def patterns_for(watch: LogWatch) -> list[Pattern]:
    """The configured patterns plus the chosen defaults (a configured name wins)."""
    chosen = (DEFAULT_PATTERNS if watch.default_patterns is True else
              {} if watch.default_patterns is False else
              {n: DEFAULT_PATTERNS[n] for n in watch.default_patterns if n in DEFAULT_PATTERNS})
    out = {name: Pattern(name, re.compile(regex), sev) for name, (regex, sev) in chosen.items()}
    for p in watch.patterns:
        out[p.name] = Pattern(p.name, re.compile(p.regex), p.severity)
    return list(out.values())


@dataclass
class _Open:
    fd: int
    ino: int
    dev: int
    offset: int
    partial: bytes = b""
    drain_until: float = 0.0
    skip_first_line: bool = False


class LogFollower:
    def __init__(self, path: Path, patterns: Iterable[Pattern], read_limit: int = 8 * 1024 * 1024,
                 rotate_wait: float = ROTATE_WAIT_SECONDS, clock: Callable[[], float] = time.monotonic,
                 from_start: bool = False) -> None:
        self.path = path
        self.patterns = list(patterns)
        self.read_limit = read_limit
        self.rotate_wait = rotate_wait
        self.clock = clock
        self._first = not from_start
        self._current: _Open | None = None
        self._draining: list[_Open] = []
        self._tail = 0
        self.lines = 0
        """Lines read so far (for tests and debugging)."""

    def tail_only(self, size: int) -> None:
        """Read only the last ``size`` bytes (from the first whole line) on first sight."""
        self._tail = size

    def close(self) -> None:
        for f in [*self._draining, *([self._current] if self._current else [])]:
            os.close(f.fd)
        self._draining, self._current = [], None

    def _count(self, f: _Open, data: bytes, counts: Counter[str], final: bool = False) -> None:
        if f.skip_first_line:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data, f.skip_first_line = data[newline + 1:], False
        data = f.partial + data
        lines = data.split(b"\n")
        f.partial = b"" if final else lines.pop()
        if len(f.partial) > MAX_LINE:  # a runaway line counts as a line
            lines.append(f.partial)
            f.partial = b""
        for raw in lines:
            if not raw and final:
                continue
            self.lines += 1
            text = raw.decode("utf-8", "replace")
            for p in self.patterns:
                if p.regex.search(text):
                    counts[p.name] += 1

    def _read(self, f: _Open, budget: int, counts: Counter[str]) -> int:
        """Read new bytes of ``f`` (at most ``budget``); returns bytes read."""
        total = 0
        while total < budget:
            chunk = os.pread(f.fd, min(1024 * 1024, budget - total), f.offset)
            if not chunk:
                break
            f.offset += len(chunk)
            total += len(chunk)
            self._count(f, chunk, counts)
        return total

    def _open(self, offset_at_end: bool) -> _Open | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        st = os.fstat(fd)
        if self._tail and st.st_size > self._tail:
            return _Open(fd, st.st_ino, st.st_dev, st.st_size - self._tail, skip_first_line=True)
        return _Open(fd, st.st_ino, st.st_dev, st.st_size if offset_at_end else 0)

    def _recover_truncated(self, f: _Open, budget: int, counts: Counter[str]) -> int:
        """After a copytruncate: read what we had not read from the copy at ``PATH.1``."""
        copy = self.path.with_name(self.path.name + ".1")
        try:
            fd = os.open(copy, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            log.info("%s was truncated and no %s to recover unread lines from", self.path, copy.name)
            return 0
        try:
            size = os.fstat(fd).st_size
            if size < f.offset:
                return 0
            tmp = _Open(fd, 0, 0, f.offset, f.partial)
            n = self._read(tmp, min(budget, size - f.offset), counts)
            self._count(tmp, b"", counts, final=True)
            return n
        finally:
            os.close(fd)

    def poll(self) -> Counter[str]:
        """New matches since the last poll, by pattern name."""
        counts: Counter[str] = Counter()
        budget = self.read_limit
        now = self.clock()
        for f in list(self._draining):
            budget -= self._read(f, budget, counts)
            if now >= f.drain_until:
                self._count(f, b"", counts, final=True)
                os.close(f.fd)
                self._draining.remove(f)
        first, self._first = self._first, False
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        cur = self._current
        if cur is None:
            if st is not None:
                self._current = cur = self._open(offset_at_end=first)
        elif st is not None and (st.st_ino, st.st_dev) != (cur.ino, cur.dev):
            budget -= self._read(cur, budget, counts)  # what the old file got until now
            cur.drain_until = now + self.rotate_wait
            self._draining.append(cur)
            self._current = cur = self._open(offset_at_end=False)
        elif st is not None and st.st_size < cur.offset:
            budget -= self._recover_truncated(cur, budget, counts)
            cur.offset, cur.partial = 0, b""
        if cur is not None and budget > 0:
            self._read(cur, budget, counts)
        return counts
