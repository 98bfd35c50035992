"""``caretaker-exporter --processes``: each service's processes, and why each is the
service's (the rules of its ``match`` it met), as the exporter finds them.

A loose ``cmdline`` regex (``ledger\\.py``) also matches an editor or a script that
mentions the name, and ``restart`` or ``stop_duplicates`` would stop it with the
service; this view shows each match with the text the regex matched, a hint where a
process does not look like the service's program, and, for a service with more
processes than ``processes.max``, which ones ``stop_duplicates`` would keep.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .config import Config
from .procfs import Explained, ProcessTable, ProcReader, explain, keep_order

__all__ = ["matched_processes", "print_matches", "run_processes"]

CMDLINE_SHOWN = 100
"""Characters of a command line the table shows (JSON has it whole)."""


def matched_processes(config: Config, reader: ProcReader | None = None) -> dict[str, list[Explained]]:
    """One scan with the exporter's :class:`ProcessTable`, explained (blocking)."""
    table = ProcessTable(reader or ProcReader(), config.services, (os.getpid(),), with_fds=False)
    return explain(table, table.scan())


def _kept(config: Config, name: str, explained: list[Explained]) -> tuple[list[int], list[int]] | None:
    """``(kept, stopped)`` pids if ``stop_duplicates`` ran now, or None when within max."""
    limit = config.services[name].processes.max
    if len(explained) <= limit:
        return None
    named = next((e.process.pid for e in explained if any(r.rule == "pidfile" for r in e.rules)), 0)
    holders = {e.process.pid for e in explained if any(r.rule == "port" for r in e.rules)}
    ranked = [p.pid for p in keep_order([e.process for e in explained], named, holders)]
    return ranked[:limit], ranked[limit:]


def _match_text(config: Config, name: str) -> str:
    given = config.services[name].match.model_dump(exclude_none=True)
    return ", ".join(f"{k}=~'{v}'" if k in ("comm", "exe", "cmdline") else f"{k}={v}" for k, v in given.items())


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size}{unit}{(seconds % size) // sub_size:02d}{sub}"
    return f"{seconds}s"


def _shorten(text: str, limit: int = CMDLINE_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def as_json(config: Config, found: dict[str, list[Explained]], now: float) -> dict[str, Any]:
    services = []
    for name, explained in found.items():
        cfg = config.services[name]
        kept = _kept(config, name, explained)
        services.append({
            "service": name,
            "match": config.services[name].match.model_dump(exclude_none=True),
            "expected": [cfg.processes.min, cfg.processes.max],
            "processes": [{
                "pid": e.process.pid, "ppid": e.process.ppid, "comm": e.process.comm, "exe": e.exe,
                "age_seconds": round(now - e.process.start_time_seconds, 1), "cmdline": e.process.cmdline,
                "rules": [{"rule": r.rule, "pattern": r.pattern, "matched": r.matched,
                           "span": list(r.span) if r.span else None, "selects": r.selects} for r in e.rules],
                "hints": list(e.hints)} for e in explained],
            "stop_duplicates": {"keep": kept[0], "stop": kept[1]} if kept else None,
        })
    return {"services": services}


def print_matches(config: Config, found: dict[str, list[Explained]], now: float) -> None:
    for name, explained in found.items():
        cfg = config.services[name]
        expected = f"{cfg.processes.min}" + (f"-{cfg.processes.max}" if cfg.processes.max != cfg.processes.min else "")
        count = f"{len(explained)} process" + ("" if len(explained) == 1 else "es")
        print(f"{name}: {count} (expected {expected}); match {_match_text(config, name)}")
        for e in explained:
            p = e.process
            age = _age(now - p.start_time_seconds)
            print(f"  {p.pid:>7}  {p.comm:<15}  up {age:<6}  {e.exe or '(exe unreadable)'}")
            print(f"           {_shorten(p.cmdline)}")
            print(f"           matched: {'; '.join(str(r) for r in e.rules) or '(no rule met now: changed since)'}")
            for hint in e.hints:
                print(f"           hint: {hint}")
        kept = _kept(config, name, explained)
        if kept:
            print(f"  stop_duplicates would keep {', '.join(map(str, kept[0]))} and stop {', '.join(map(str, kept[1]))}"
                  " (the pidfile's first, then the port holders, then the oldest)")


def run_processes(config: Config, json_out: bool) -> int:
    """Print the view (a table, or JSON); exit status 0."""
    found = matched_processes(config)
    now = time.time()
    if json_out:
        print(json.dumps(as_json(config, found, now), indent=2))
    else:
        print_matches(config, found, now)
    return 0
