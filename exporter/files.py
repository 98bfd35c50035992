"""Files, directories and filesystems a service depends on.

All functions are blocking (file system reads): call them from a thread. Ports and
who holds them are process discovery: :mod:`exporter.sockets`.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from .config import DirectoryCheck, FileCheck

__all__ = [
    "DirStatus",
    "FileChecker",
    "FileStatus",
    "Parsed",
    "check_directory",
    "check_parse",
    "filesystem",
]

PARSE_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileStatus:
    exists: bool
    valid: bool | None
    """Parses as its declared format (always true without a format); None when it
    could not be checked (not a regular file, over the parse limit)."""
    mtime: float = 0.0
    size: int = 0
    attributes_ok: bool = True
    """Mode, owner and group are as declared (true when none is declared)."""
    fresh: bool = True
    """Modified within ``max_age`` (true without one)."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.exists and self.valid is not False and self.attributes_ok and self.fresh


@dataclass(frozen=True)
class DirStatus:
    exists: bool
    attributes_ok: bool = True

    @property
    def ok(self) -> bool:
        return self.exists and self.attributes_ok


def _uid(owner: str) -> int:
    return int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid


def _gid(group: str) -> int:
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def _attributes(st: os.stat_result, mode: str | None, owner: str | None = None, group: str | None = None) -> str:
    """Empty when all declared attributes match, else what differs."""
    problems = []
    if mode is not None and stat.S_IMODE(st.st_mode) != int(mode, 8):
        problems.append(f"mode {stat.S_IMODE(st.st_mode):04o}, expected {int(mode, 8):04o}")
    try:
        if owner is not None and st.st_uid != _uid(owner):
            problems.append(f"owner uid {st.st_uid}, expected {owner}")
        if group is not None and st.st_gid != _gid(group):
            problems.append(f"group gid {st.st_gid}, expected {group}")
    except KeyError as err:
        problems.append(f"unknown user or group: {err}")
    return "; ".join(problems)


class Parsed(NamedTuple):
    """What a parse check found: ``valid`` True (it parses), False (proven not to
    parse), or None (not checked: not a regular file, over the size limit, unreadable)."""

    valid: bool | None
    detail: str = ""


def _discard(pairs: object) -> None:
    return None  # a JSON object is validated, not kept: memory stays near the file's size


def check_parse(path: Path, fmt: str, limit: int = PARSE_LIMIT) -> Parsed:
    """Whether ``path`` parses as ``fmt`` (json or yaml), at a bounded cost.

    Only a regular file is read: it is opened non-blocking and checked with fstat, so
    a FIFO, socket or device is reported, never read (a FIFO would block forever). A
    file over ``limit`` bytes is not checked rather than called corrupt. Never raises.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        return Parsed(None, f"cannot open: {err.strerror}")
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Parsed(None, f"not a regular file ({_kind(st.st_mode)}): not read")
        if st.st_size > limit:
            return Parsed(None, f"{st.st_size} bytes, over the parse limit of {limit}: not checked")
        try:
            data = f.read(limit + 1)
        except OSError as err:
            return Parsed(None, f"cannot read: {err.strerror}")
    if len(data) > limit:
        return Parsed(None, f"grew over the parse limit of {limit} bytes while read: not checked")
    try:
        if fmt == "json":
            json.loads(data, object_pairs_hook=_discard)
        else:
            yaml.safe_load(data)
    except (UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as err:
        return Parsed(False, f"does not parse as {fmt}: {str(err).splitlines()[0][:200]}")
    return Parsed(True)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


class FileChecker:
    """Checks one declared file; a parse result is reused while the file is unchanged."""

    def __init__(self, spec: FileCheck, path: Path) -> None:
        self.spec = spec
        self.path = path
        self._parsed: tuple[tuple[int, int, int], Parsed] | None = None

    def check(self, now: float) -> FileStatus:
        try:
            st = os.stat(self.path)
        except OSError as err:
            return FileStatus(False, False, detail=err.strerror or "missing")
        if not stat.S_ISREG(st.st_mode):
            return FileStatus(True, None, st.st_mtime, st.st_size, detail=f"{_kind(st.st_mode)}: not read")
        parsed = Parsed(True)
        if self.spec.format is not None:
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._parsed is None or self._parsed[0] != key:
                self._parsed = (key, check_parse(self.path, self.spec.format, self.spec.max_parse_bytes))
            parsed = self._parsed[1]
        attrs = _attributes(st, self.spec.mode, self.spec.owner, self.spec.group)
        fresh = self.spec.max_age is None or now - st.st_mtime <= self.spec.max_age
        return FileStatus(True, parsed.valid, st.st_mtime, st.st_size, not attrs, fresh,
                          "; ".join(p for p in (parsed.detail, attrs, "" if fresh else "stale") if p))


def check_directory(spec: DirectoryCheck, path: Path) -> DirStatus:
    try:
        st = os.stat(path)
    except OSError:
        return DirStatus(False, False)
    if not stat.S_ISDIR(st.st_mode):
        return DirStatus(False, False)
    return DirStatus(True, not _attributes(st, spec.mode))


def filesystem(path: Path) -> tuple[int, int] | None:
    """``(avail_bytes, size_bytes)`` of the filesystem holding ``path`` (as ``df``), or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
