"""Repairs that touch files, databases and endpoints rather than processes.

- ``rotate_logs``: rename (or copy and truncate) each log file, shift ``.1 .2 ...``,
  gzip all but the newest rotated file, keep ``keep`` of them; send ``reopen_signal``
  after a rename so the writer reopens its log.
- ``clean``: delete files matching a glob and older than an age, only inside the
  directories the config lists, never following a symlink (a symlink is skipped, never
  deleted through); the bytes freed are reported.
- ``ensure_paths``: create missing declared directories, fix their declared mode.
- ``restore_file``: for a declared JSON/YAML file that is missing or no longer parses,
  keep the corrupt copy aside, restore the newest backup that parses (the receiver keeps
  backups of each declared file while it is valid, see :class:`BackupKeeper`), or the
  declared ``default``. Writes are atomic (temporary file, then rename).
- ``vacuum``: ``VACUUM (ANALYZE)`` with a statement timeout (asyncpg).
- ``http``: call the declared endpoint; success when the status is expected.
- ``exec``: the declared argv, alert labels only as whole declared argv items.

Every path comes from the config, resolved against its directory; nothing from an
alert ever becomes a path.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gzip
import logging
import os
import re
import shutil
import signal
import stat
import time
from pathlib import Path

import aiohttp
import asyncpg

from exporter.config import Config, FileCheck
from exporter.files import check_parse
from exporter.private import private_dir, write_private

from .actions import ActionContext, ActionFunc, RepairFailed, StepLog, failing_repair, find_processes
from .process import run_command, send_signal_each

__all__ = ["ACTIONS", "BackupKeeper"]

log = logging.getLogger(__name__)


# --- rotate_logs ------------------------------------------------------------------------

def _log_paths(ctx: ActionContext, name: str) -> list[Path]:
    cfg = ctx.config.services[name]
    paths = [ctx.config.resolve(w.path) for w in cfg.logs]
    if cfg.start is not None and cfg.start.log_file:
        paths.append(ctx.config.resolve(cfg.start.log_file))
    return list(dict.fromkeys(paths))


def _rotated(path: Path, i: int, gz: bool) -> Path:
    return path.with_name(f"{path.name}.{i}{'.gz' if gz else ''}")


def _gzip(src: Path) -> None:
    dst = src.with_name(src.name + ".gz")
    with open(src, "rb") as fin, gzip.open(dst.with_name(dst.name + ".tmp"), "wb") as fout:
        shutil.copyfileobj(fin, fout)
    dst.with_name(dst.name + ".tmp").replace(dst)
    src.unlink()


def rotate_file(path: Path, keep: int, compress: bool, copytruncate: bool) -> str:
    """Rotate one file (blocking). Returns what was done."""
    st = os.stat(path)
    if st.st_size == 0:
        return f"{path.name}: empty, not rotated"
    for i in range(keep, 0, -1):  # shift, dropping what falls beyond keep
        for gz in (True, False):
            src = _rotated(path, i, gz)
            if src.exists():
                if i == keep:
                    src.unlink()
                else:
                    src.replace(_rotated(path, i + 1, gz))
    first = _rotated(path, 1, False)
    if copytruncate:
        shutil.copy2(path, first)
        with open(path, "r+b") as f:
            f.truncate(0)
    else:
        path.replace(first)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(st.st_mode))
        os.close(fd)
        if os.geteuid() == 0:
            os.chown(path, st.st_uid, st.st_gid)
    if compress:
        for i in range(2, keep + 1):
            plain = _rotated(path, i, False)
            if plain.exists():
                _gzip(plain)
    how = "copied and truncated" if copytruncate else "renamed"
    return f"{path.name}: {st.st_size} bytes {how} to {first.name}"


async def rotate_logs(ctx: ActionContext, name: str, step: StepLog) -> None:
    cfg = ctx.config.services[name]
    opts = cfg.remediation.rotate_logs
    renamed = False
    for path in _log_paths(ctx, name):
        if not path.exists():
            step(f"{path}: does not exist, nothing to rotate")
            continue
        try:
            step(await asyncio.to_thread(rotate_file, path, opts.keep, opts.compress, opts.copytruncate))
        except OSError as err:
            raise RepairFailed(f"rotating {path}: {err}") from err
        renamed = renamed or not opts.copytruncate
    if renamed and opts.reopen_signal:
        procs = await find_processes(ctx, name)
        for line in await asyncio.to_thread(send_signal_each, ctx.reader, procs, signal.Signals[opts.reopen_signal]):
            step(line)


# --- clean --------------------------------------------------------------------------------

def clean_directory(root: Path, glob: str, older_than: float, recursive: bool, now: float) -> tuple[int, int]:
    """Delete matching old regular files under ``root`` (blocking); ``(files, bytes)`` freed.

    Symlinks are never followed nor deleted; a file whose real path is outside ``root``
    (a race with a rename) is left alone.
    """
    real_root = os.path.realpath(root)
    files = freed = 0
    stack = [real_root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as err:
            log.warning("clean: cannot read %s: %s", directory, err)
            continue
        for entry in entries:
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    stack.append(entry.path)
                continue
            if not entry.is_file(follow_symlinks=False) or not fnmatch.fnmatch(entry.name, glob):
                continue
            st = entry.stat(follow_symlinks=False)
            if now - st.st_mtime < older_than:
                continue
            if os.path.commonpath([real_root, os.path.realpath(entry.path)]) != real_root:
                continue
            try:
                os.unlink(entry.path)
            except OSError as err:
                log.warning("clean: cannot delete %s: %s", entry.path, err)
                continue
            files += 1
            freed += st.st_size
    return files, freed


async def clean(ctx: ActionContext, name: str, step: StepLog) -> None:
    cfg = ctx.config.services[name]
    total = 0
    for rule in cfg.remediation.clean:
        root = ctx.config.resolve(rule.directory)
        if not root.is_dir():
            step(f"{root}: not a directory, skipped")
            continue
        files, freed = await asyncio.to_thread(clean_directory, root, rule.glob, rule.older_than, rule.recursive,
                                               time.time())
        total += freed
        step(f"{root}: deleted {files} files matching {rule.glob!r} older than {rule.older_than:g}s, "
             f"{freed} bytes freed", bytes_freed=freed)
    step(f"{total} bytes freed in all", bytes_freed=total)


# --- ensure_paths ---------------------------------------------------------------------------

async def ensure_paths(ctx: ActionContext, name: str, step: StepLog) -> None:
    for d in ctx.config.services[name].directories:
        path = ctx.config.resolve(d.path)
        mode = int(d.mode, 8) if d.mode else None
        try:
            if not path.exists():
                path.mkdir(parents=True, mode=mode if mode is not None else 0o755)
                step(f"created {path}")
            elif not path.is_dir():
                raise RepairFailed(f"{path} exists and is not a directory; not touching it")
            if mode is not None and stat.S_IMODE(path.stat().st_mode) != mode:
                path.chmod(mode)
                step(f"{path}: mode set to {mode:04o}")
        except OSError as err:
            raise RepairFailed(f"{path}: {err}") from err
    step("all declared directories exist with their declared modes")


# --- restore_file and its backups ---------------------------------------------------------------

def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip(".") or "_"


class BackupKeeper:
    """Keeps up to ``backups`` copies of each declared file that has a format, while it parses.

    Backups live in ``DIR/<service>/<path made safe>/<unix time ns>``; a new one is
    taken only when the file changed (size, mtime) and still parses.
    """

    def __init__(self, config: Config, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self._seen: dict[Path, tuple[int, int]] = {}

    def folder(self, service: str, spec: FileCheck) -> Path:
        return self.directory / _safe(service) / _safe(spec.path)

    def run_once(self) -> int:
        """Back up every changed valid file (blocking). Returns how many were taken."""
        taken = 0
        for service, cfg in self.config.services.items():
            for spec in cfg.files:
                if spec.backups and spec.format:
                    taken += self._backup(service, spec)
        return taken

    def _backup(self, service: str, spec: FileCheck) -> int:
        path = self.config.resolve(spec.path)
        try:
            st = path.stat()
        except OSError:
            return 0
        key = (st.st_size, st.st_mtime_ns)
        if self._seen.get(path) == key:
            return 0  # unchanged since we last looked (valid and backed up, or invalid)
        self._seen[path] = key
        if check_parse(path, spec.format or "json", spec.max_parse_bytes).valid is not True:
            return 0  # never back up a file that does not parse, or that could not be checked
        folder = private_dir(self.folder(service, spec))
        newest = sorted(folder.iterdir())
        data = path.read_bytes()
        if newest and newest[-1].read_bytes() == data:
            return 0
        target = folder / f"{time.time_ns()}"
        write_private(target, data)  # a state file may hold secrets: 0600, whatever its own mode
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        for old in sorted(p for p in folder.iterdir() if p.suffix != ".tmp")[:-spec.backups]:
            old.unlink()
        return 1

    def newest_valid(self, service: str, spec: FileCheck) -> Path | None:
        folder = self.folder(service, spec)
        if not folder.is_dir():
            return None
        for candidate in sorted((p for p in folder.iterdir() if p.suffix != ".tmp"), reverse=True):
            if check_parse(candidate, spec.format or "json", spec.max_parse_bytes).valid is True:
                return candidate
        return None


def _atomic_copy(src: Path, dst: Path, mode: int | None) -> None:
    tmp = dst.with_name(f".{dst.name}.caretaker-{os.getpid()}")
    shutil.copyfile(src, tmp)
    if mode is not None:
        os.chmod(tmp, mode)
    tmp.replace(dst)


def restore_one(ctx: ActionContext, keeper: BackupKeeper, service: str, spec: FileCheck) -> str:
    """Restore one declared file if it is missing or does not parse (blocking)."""
    path = ctx.config.resolve(spec.path)
    fmt = spec.format or "json"
    mode = None
    if path.exists():
        parsed = check_parse(path, fmt, spec.max_parse_bytes) if spec.format else None
        if parsed is None or parsed.valid is True:
            return f"{path}: valid, nothing to restore"
        if parsed.valid is None:  # never replace a file that could not be proven corrupt
            raise RepairFailed(f"{path}: {parsed.detail}; not proven corrupt, so not replaced")
        problem = parsed.detail
        mode = stat.S_IMODE(path.stat().st_mode)
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        path.replace(aside)
        kept = f"{path}: {problem}; corrupt copy kept as {aside.name}"
    else:
        kept = f"{path}: missing"
    backup = keeper.newest_valid(service, spec)
    if backup is not None:
        _atomic_copy(backup, path, mode)
        return f"{kept}; restored the backup of {time.ctime(backup.stat().st_mtime)}"
    if spec.default is not None:
        default = ctx.config.resolve(spec.default)
        if spec.format and check_parse(default, fmt, spec.max_parse_bytes).valid is not True:
            raise RepairFailed(f"{kept}; no valid backup, and the default {default} does not parse either")
        _atomic_copy(default, path, mode)
        return f"{kept}; no valid backup, restored the default {default}"
    raise RepairFailed(f"{kept}; no valid backup and no default to restore")


async def restore_file(ctx: ActionContext, name: str, step: StepLog) -> None:
    keeper = ctx.backups
    if not isinstance(keeper, BackupKeeper):
        raise RepairFailed("the receiver keeps no backups (internal error)")
    for spec in ctx.config.services[name].files:
        if spec.format or spec.default:
            try:
                step(await asyncio.to_thread(restore_one, ctx, keeper, name, spec))
            except OSError as err:
                raise RepairFailed(f"{spec.path}: {err}") from err


# --- vacuum, http, exec -------------------------------------------------------------------------

def _quote_ident(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


async def vacuum(ctx: ActionContext, name: str, step: StepLog) -> None:
    spec = ctx.config.services[name].remediation.vacuum
    assert spec is not None
    password = ctx.probes.secret(spec.password)
    try:
        conn = await asyncpg.connect(host=spec.host, port=spec.port, user=spec.user, database=spec.database,
                                     password=password, timeout=10, ssl=spec.tls)
    except (OSError, asyncpg.PostgresError, TimeoutError) as err:
        raise RepairFailed(f"cannot connect to PostgreSQL {spec.host}:{spec.port}/{spec.database}: {err}") from err
    try:
        await conn.execute(f"SET statement_timeout = {int(spec.statement_timeout * 1000)}")
        for table in spec.tables or (None,):
            started = time.monotonic()
            target = _quote_ident(table) if table else ""
            try:
                await conn.execute(f"VACUUM (ANALYZE) {target}")
            except asyncpg.PostgresError as err:
                raise RepairFailed(f"VACUUM (ANALYZE) {table or spec.database}: {err}") from err
            step(f"VACUUM (ANALYZE) {table or '(whole database ' + spec.database + ')'} "
                 f"took {time.monotonic() - started:.2f}s")
    finally:
        await conn.close()


async def call_http(ctx: ActionContext, name: str, step: StepLog) -> None:
    spec = ctx.config.services[name].remediation.http
    assert spec is not None
    try:
        async with asyncio.timeout(spec.timeout), ctx.session.request(spec.method, spec.url) as resp:
            body = (await resp.content.read(2048)).decode("utf-8", "replace")
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        raise RepairFailed(f"{spec.method} {spec.url}: {type(err).__name__}: {err}") from err
    step(f"{spec.method} {spec.url}: HTTP {resp.status}", body=body)
    if resp.status not in spec.expect_status:
        raise RepairFailed(f"{spec.method} {spec.url} answered {resp.status}, expected {list(spec.expect_status)}")


def exec_argv(argv: tuple[str, ...], declared: dict[str, str], labels: dict[str, str] | None) -> list[str]:
    """argv with ``{name}`` items replaced by alert labels that fully match their declared regex."""
    out = []
    for item in argv:
        m = re.fullmatch(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}", item)
        if m is None:
            out.append(item)
            continue
        label = m.group(1)
        value = (labels or {}).get(label)
        if value is None:
            raise RepairFailed(f"the alert has no label {label!r} for argv item {item}")
        if not re.fullmatch(declared[label], value):
            raise RepairFailed(f"label {label}={value[:100]!r} does not match {declared[label]!r}; not running")
        out.append(value)
    return out


async def run_exec(ctx: ActionContext, name: str, step: StepLog) -> None:
    spec = ctx.config.services[name].remediation.exec
    assert spec is not None
    argv = exec_argv(spec.argv, dict(spec.labels), dict(ctx.labels))
    with failing_repair():
        status, output = await run_command(argv, spec.timeout, ctx.config.base_dir)
    step(f"ran {argv[0]} ({len(argv) - 1} arguments): exit status {status}", output=output)
    if status != 0:
        raise RepairFailed(f"{argv[0]} exited with status {status}")


ACTIONS: dict[str, ActionFunc] = {
    "rotate_logs": rotate_logs, "clean": clean, "ensure_paths": ensure_paths, "restore_file": restore_file,
    "vacuum": vacuum, "http": call_http, "exec": run_exec,
}
