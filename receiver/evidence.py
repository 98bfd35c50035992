"""Evidence kept before a destructive repair (restart, stop_duplicates, free_port).

A frozen server that is simply killed teaches nobody anything. Before stopping
processes the receiver writes ``EVIDENCE_DIR/<time>-<service>.json`` with:

- the last ``evidence.log_lines`` lines of the service's log files;
- each process: pid, ppid, state, wchan (``/proc/PID/wchan``: where it sleeps in the
  kernel), CPU seconds, RSS, age, threads, command line, and its children;
- for a Python process, when ``py-spy`` is installed, ``py-spy dump`` of its stacks.
  A process is Python's by its executable (``/proc/PID/exe``: ``python3``,
  ``python3.11``, ``pypy3``...), not its name: gunicorn, uvicorn and celery run as
  ``python3.11`` with comm ``gunicorn``, ``uvicorn``, ``celery`` (their script's name).

The directory is kept under ``evidence.max_bytes`` by deleting the oldest files. The
audit entry's step names the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from exporter.config import Config
from exporter.private import private_dir, write_private
from exporter.procfs import ProcessInfo, ProcReader

from .actions import StepLog
from .process import run_command

__all__ = ["EvidenceKeeper"]

log = logging.getLogger(__name__)

PY_SPY_TIMEOUT = 10.0


def find_py_spy() -> str | None:
    """py-spy on PATH, or next to the running Python (a virtualenv's bin/ is often not on PATH)."""
    found = shutil.which("py-spy")
    if found is None:
        beside = Path(sys.executable).parent / "py-spy"
        found = str(beside) if beside.exists() else None
    return found


def tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 256 * 1024))
            return [line.decode("utf-8", "replace").rstrip("\n") for line in deque(f, maxlen=lines)]
    except OSError as err:
        return [f"(cannot read {path}: {err.strerror})"]


PYTHON_EXECUTABLES = ("python", "pypy")
"""How the basename of a Python interpreter's executable starts (CPython, PyPy)."""


def is_python(reader: ProcReader, p: ProcessInfo) -> bool:
    """Whether ``p`` runs a Python interpreter, by its executable; by its name when the
    executable cannot be read (another user's process without CAP_SYS_PTRACE)."""
    exe = reader.exe(p.pid)
    if exe is None:
        return p.comm.startswith(PYTHON_EXECUTABLES)
    return posixpath.basename(exe.removesuffix(" (deleted)")).startswith(PYTHON_EXECUTABLES)


def process_facts(reader: ProcReader, p: ProcessInfo) -> dict[str, Any]:
    try:
        wchan = Path(reader.root, str(p.pid), "wchan").read_text().strip() or "0"
    except OSError:
        wchan = "?"
    children = [int(c) for c in _children(reader, p.pid)]
    return {"pid": p.pid, "ppid": p.ppid, "pgid": p.pgid, "comm": p.comm, "state": p.state, "wchan": wchan,
            "cpu_seconds": p.cpu_seconds, "rss_bytes": p.rss_bytes, "threads": p.num_threads,
            "age_seconds": round(time.time() - p.start_time_seconds, 3), "cmdline": p.cmdline[:4096],
            "children": children}


def _children(reader: ProcReader, pid: int) -> list[str]:
    out: list[str] = []
    try:
        for tid in os.listdir(f"{reader.root}/{pid}/task"):
            try:
                out += Path(reader.root, str(pid), "task", tid, "children").read_text().split()
            except OSError:
                continue
    except OSError:
        pass
    return out


class EvidenceKeeper:
    def __init__(self, config: Config, directory: Path, reader: ProcReader) -> None:
        self.config = config
        self.directory = directory
        self.reader = reader

    async def __call__(self, name: str, procs: list[ProcessInfo], step: StepLog) -> None:
        spec = self.config.receiver.evidence
        cfg = self.config.services[name]
        logs = [self.config.resolve(w.path) for w in cfg.logs]
        if cfg.start is not None and cfg.start.log_file:
            logs.append(self.config.resolve(cfg.start.log_file))
        data: dict[str, Any] = {
            "service_name": name, "at": time.time(),
            "processes": [process_facts(self.reader, p) for p in procs],
            "logs": {str(p): tail(p, spec.log_lines) for p in dict.fromkeys(logs)} if spec.log_lines else {},
            "py_spy": {},
        }
        py_spy = find_py_spy() if spec.py_spy else None
        if py_spy:
            for p in procs:
                if is_python(self.reader, p):
                    try:
                        # --nonblocking reads the stacks without pausing the process (and works on
                        # one that is already stopped, where a pausing dump fails).
                        status, output = await run_command([py_spy, "dump", "--nonblocking", "--pid", str(p.pid)],
                                                           PY_SPY_TIMEOUT)
                        data["py_spy"][str(p.pid)] = output if status == 0 else f"py-spy exit {status}: {output}"
                    except Exception as err:  # a dump is a bonus, never a blocker
                        data["py_spy"][str(p.pid)] = f"py-spy failed: {err}"
        path = await asyncio.to_thread(self._write, name, data)
        step(f"evidence kept in {path}", evidence=str(path),
             processes=[{k: f[k] for k in ("pid", "state", "wchan", "cpu_seconds", "rss_bytes", "age_seconds")}
                        for f in data["processes"]])

    def _write(self, name: str, data: dict[str, Any]) -> Path:
        private_dir(self.directory)
        path = self.directory / f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}-{name}.json"
        write_private(path, json.dumps(data, indent=1).encode())
        self._prune()
        return path

    def _prune(self) -> None:
        limit = self.config.receiver.evidence.max_bytes
        files = sorted(self.directory.glob("*.json"))
        sizes = {f: f.stat().st_size for f in files}
        total = sum(sizes.values())
        for f in files[:-1]:  # always keep the newest
            if total <= limit:
                break
            f.unlink()
            total -= sizes[f]
