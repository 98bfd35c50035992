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

Lines are matched by :class:`LineMatcher`: patterns in Python ``re`` syntax, run by RE2
(google-re2) when RE2 can take them, so matching is linear in the text and no pattern
can stall log reading, whatever the log holds. A line that matches several patterns
counts once for each.

Blocking (file I/O): call :meth:`LogFollower.poll` from a thread.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LogWatch

__all__ = ["DEFAULT_PATTERNS", "LineMatcher", "LogFollower", "Pattern", "matcher_for", "patterns_for"]

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
    # One line per real out-of-memory event: the kernel's OOM killer ("Out of memory: Killed
    # process N", "Memory cgroup out of memory: Killed process N"; kernels before 5.1 say
    # "Kill process"), Python's MemoryError, PostgreSQL's "ERROR:  out of memory" (and its
    # client exceptions), Redis's OOM error reply, ENOMEM's strerror.
    "out_of_memory": (
        r"\bMemoryError\b|(?i:out of memory): Kill(?:ed)? process \d+|"
        r"\b(?:ERROR|FATAL|PANIC|OutOfMemory(?:Error)?):\s+out of memory\b|"
        r"\bOOM command not allowed\b|Cannot allocate memory", "critical"),
    # gunicorn's arbiter on a worker that died of a signal (gunicorn/arbiter.py reap_workers):
    # "Worker (pid:N) was sent SIGKILL! Perhaps out of memory?". SIGKILL is also how gunicorn
    # ends a worker stuck past its timeout, so this is a killed worker, not proof of an OOM
    # (the kernel's own line is, above); SIGTERM is a normal shutdown and does not count.
    "worker_killed": (r"\bWorker \(pid:\d+\) was sent (?:SIG(?:KILL|SEGV|BUS|ABRT|ILL|FPE)|signal \d+)!",
                      "error"),
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


_NOT_THE_SAME_IN_RE2 = re.compile(r"\[:|\{,")
"""Syntax both engines accept with different meanings: ``[[:digit:]]`` is a POSIX class in
RE2 and a set of characters in ``re``; ``x{,3}`` is ``x{0,3}`` in ``re`` and literal in RE2."""
_WHOLE_TEXT_ANCHOR = re.compile(r"\\[Az]|\(\?[a-zA-Z]*-[a-zA-Z]*m")
"""``\\A``, ``\\z`` or multi-line mode turned off: such a pattern must see one line at a
time (in a block of lines it would anchor at the block's ends)."""


def _in_re2(source: str, re2: Any, options: Any) -> tuple[Any, str]:
    """``source`` compiled by RE2, or None and why RE2 cannot run it with ``re``'s meaning."""
    if _NOT_THE_SAME_IN_RE2.search(source):
        return None, "it uses [: or {, which RE2 reads differently"
    try:
        return re2.compile(source, options), ""
    except re2.error as err:
        why = err.args[0] if err.args else err
        return None, "RE2 cannot take it: " + (why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why))


class LineMatcher:
    """Counts, per pattern, the lines of a block of text that match it.

    Patterns are written in Python ``re`` syntax (the config validates them with ``re``).
    Each runs under one of two engines:

    - **RE2** (google-re2), for every pattern RE2 accepts with the same meaning: one
      automaton for all of them (their alternation, in multi-line mode) scans the whole
      block, and each line it stops on is tested against all of them at once (an
      ``RE2::Set``) to learn which match. Time is linear in the text: no pattern can make
      the scan backtrack. RE2's ``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only
      where ``re``'s are Unicode-aware; on ASCII text the two agree.
    - **Python's** ``re``, line by line, for the patterns RE2 refuses (backreferences,
      lookarounds, ``\\Z``, atomic groups, possessive quantifiers, ``(?x)``, ``(?a)``,
      ``\\uXXXX``, repeats over 1000) or reads differently (``[[:digit:]]``,
      ``x{,3}``). :attr:`slow` names them with the reason; they cost what they cost before.

    A line that matches several patterns counts once for each. Lines are read as UTF-8
    with invalid bytes replaced (U+FFFD), as before. Build it in one thread; :meth:`count`
    may then run in any thread.
    """

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        import re2  # noqa: PLC0415 - an exporter that follows no log never loads it

        options = re2.Options()
        options.log_errors = False  # refusals are reported in self.slow, not on stderr
        self.slow: dict[str, str] = {}
        """Patterns that run under Python's ``re``, by name, with why."""
        self._slow: list[Pattern] = []
        scanned: list[tuple[str, Any]] = []
        self._per_line: list[tuple[str, Any]] = []
        """RE2 patterns that must see one line at a time (``\\A``, ``(?-m:``)."""
        for p in patterns:
            compiled, reason = _in_re2(p.regex.pattern, re2, options)
            if compiled is None:
                self.slow[p.name] = reason
                self._slow.append(p)
            elif _WHOLE_TEXT_ANCHOR.search(p.regex.pattern):
                self._per_line.append((p.name, compiled))
            else:
                scanned.append((p.name, compiled))
        self._scan: Any = None
        self._which: Any = None
        if scanned:
            # RE2 scopes flags to their group: (?:(?i)a) leaves the other alternatives alone.
            alternation = "(?m)" + "|".join(f"(?:{rx.pattern})" for _, rx in scanned)
            scan_options = re2.Options()
            scan_options.log_errors, scan_options.never_capture = False, True  # only where it starts matters
            try:
                self._scan = re2.compile(alternation, scan_options)
                self._which = re2.Set.SearchSet(options)
                for _, rx in scanned:
                    self._which.Add(rx.pattern)
                self._which.Compile()
            except re2.error:  # too big for one automaton: test every line instead
                self._per_line, scanned, self._scan = self._per_line + scanned, [], None
        self._scanned = scanned

    def count(self, block: bytes, counts: Counter[str]) -> None:
        """Add to ``counts`` the matches in ``block``: whole lines joined by ``b"\\n"``
        (one line, possibly empty, when it has no newline)."""
        if not block.isascii():
            try:
                block.decode("utf-8")
            except UnicodeDecodeError:
                block = block.decode("utf-8", "replace").encode("utf-8")
        if self._scan is not None:
            search, which, patterns, end = self._scan.search, self._which.Match, self._scanned, len(block)
            pos = 0
            while pos <= end:
                found = search(block, pos)
                if found is None:
                    break
                # The line where the match starts (a match may run on past its end: the
                # alternation sees the block; a pattern counts only within one line).
                at = found.start()
                stop = block.find(b"\n", at)
                stop = end if stop < 0 else stop
                line = block[block.rfind(b"\n", 0, at) + 1:stop]
                hits = which(line)
                if hits:
                    for i in hits:
                        counts[patterns[i][0]] += 1
                else:  # a match that ran past the line, or a set that ran out of memory (it says nothing)
                    for name, rx in patterns:
                        if rx.search(line) is not None:
                            counts[name] += 1
                pos = stop + 1
        if self._per_line or self._slow:
            for line in block.split(b"\n"):
                for name, rx in self._per_line:
                    if rx.search(line) is not None:
                        counts[name] += 1
                if self._slow:
                    text = line.decode("utf-8")
                    for p in self._slow:
                        if p.regex.search(text):
                            counts[p.name] += 1


@functools.lru_cache(maxsize=64)
def matcher_for(patterns: tuple[Pattern, ...]) -> LineMatcher:
    """One matcher per distinct pattern list, shared by the logs that use it."""
    return LineMatcher(patterns)


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
        self.matcher = matcher_for(tuple(self.patterns))
        for name, reason in self.matcher.slow.items():
            log.warning("%s: log pattern %s runs under Python's re, line by line (%s): slower, and a pattern "
                        "that backtracks badly can stall reading this log", path, name, reason)
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
        if final:  # what is left: every non-empty line, the last one without its newline
            lines = [line for line in data.split(b"\n") if line]
            f.partial = b""
            self.lines += len(lines)
            if lines:
                self.matcher.count(b"\n".join(lines), counts)
            return
        cut = data.rfind(b"\n")
        block, f.partial = (data[:cut], data[cut + 1:]) if cut >= 0 else (b"", data)
        n = block.count(b"\n") + 1 if cut >= 0 else 0
        if len(f.partial) > MAX_LINE:  # a runaway line counts as a line
            block = block + b"\n" + f.partial if n else f.partial
            f.partial = b""
            n += 1
        if n:
            self.lines += n
            self.matcher.count(block, counts)

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
