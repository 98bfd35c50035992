"""What is true of a service now: the receiver looks before it acts.

An alert says a service *had* a problem when Prometheus last evaluated its rules; the
notification may be late (a retry, a receiver that was down) and the service may have
recovered by itself. Before every action the receiver observes the service with the
same matching and probes the exporter uses, and the specific thing the alert is about:

==============================  ==========================================================
alert                           the condition that must still hold
==============================  ==========================================================
CaretakerServiceDown            fewer processes than ``processes.min``
CaretakerServiceDuplicated      more processes than ``processes.max``
CaretakerProbeFailing           the probe (label ``probe``, else any) fails
                                ``receiver.confirm.probe_failures`` times in a row, or
                                the service is down
CaretakerHeartbeatMissing       the heartbeat (label ``heartbeat``) is older than its
                                timeout (plus the file's save lag) in the exporter's
                                state file (read by :mod:`receiver.heartbeats`), or the
                                service is down
CaretakerMemoryAboveLimit       resident memory above ``limits.memory_bytes``
CaretakerFdExhaustion           a process holds over 90% of ``limits.open_fds``
CaretakerPortConflict           a declared port is held by a process not of the service
CaretakerFileCorrupt, ...Missing a declared file is missing or does not parse
CaretakerDirectoryMissing       a declared directory is missing or has the wrong mode
CaretakerDiskAlmostFull         a data path's filesystem has under 10% free
CaretakerClaimsOrphaned         some of the service's claims are orphaned now (a scan of
                                them, with the owners' pids looked up here)
==============================  ==========================================================

For any other alert the condition cannot be observed (``holds`` is ``None``): the
reconciler then acts once, and again only for a restart while the service is unhealthy.

What is observed also decides what can help: a probe that fails for ``auth`` or ``tls``
is not fixed by a restart (``escalate`` says so).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.files import FileChecker, check_directory, filesystem
from exporter.probes import ProbeResult, run_probe, run_probes
from exporter.procfs import ProcessInfo
from exporter.sockets import check_ports

from . import heartbeats
from .actions import ActionContext, find_processes
from .claims import orphaned_now

__all__ = ["ESCALATING_REASONS", "Observation", "observe"]

ESCALATING_REASONS = frozenset({"auth", "tls"})
"""Probe failure reasons that a restart cannot fix: a person must look."""
DISK_FREE_RATIO = 0.1
"""The free-space ratio under which ``CaretakerDiskAlmostFull`` holds (as in the rule)."""
FD_RATIO = 0.9


@dataclass
class Observation:
    """One look at a service (JSON-able through :meth:`as_json`, for the audit trail)."""

    processes: int
    expected: tuple[int, int]
    healthy: bool
    """Processes within ``[min, max]`` and every probe passing."""
    holds: bool | None
    """Whether the alert's condition is still there; ``None`` when it cannot be observed."""
    condition: str
    """What was checked and seen, in words."""
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    escalate: str = ""
    """Why a repair cannot help (e.g. ``probe_auth``); empty when it can."""
    pids: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"processes": self.processes, "expected": list(self.expected), "healthy": self.healthy,
                "holds": self.holds, "condition": self.condition, "probes": self.probes,
                "escalate": self.escalate, "pids": self.pids[:20]}


def _probe_json(result: ProbeResult) -> dict[str, Any]:
    return {"success": result.success, "reason": result.reason, "detail": result.detail[:300]}


async def _confirm_probe(ctx: ActionContext, service: str, name: str | None,
                         stopped: bool) -> tuple[bool, dict[str, Any], str]:
    """Run the probe(s) ``confirm.probe_failures`` times, their starts spread over
    ``confirm.window`` seconds (or ``confirm.interval`` apart when every process is
    ``stopped``, state T). Returns whether one probe failed every time, the last
    results, and the escalation reason when every failure of that probe was auth or tls."""
    cfg = ctx.config.services[service]
    confirm = ctx.config.receiver.confirm
    probes = [p for p in cfg.probes if name is None or p.name == name] or list(cfg.probes)
    if not probes:
        return False, {}, ""
    runs = confirm.probe_failures

    async def run_at(delay: float) -> dict[str, ProbeResult]:
        await asyncio.sleep(delay)
        results = await asyncio.gather(*(run_probe(p, ctx.probes) for p in probes))
        return {p.name: r for p, r in zip(probes, results, strict=True)}

    def some_probe_failed_every_time(rounds: list[dict[str, ProbeResult]]) -> bool:
        return any(all(not rd[p.name].success for rd in rounds) for p in probes)

    rounds: list[dict[str, ProbeResult]]
    if stopped:  # nothing to wait for: overlapping tries, as fast as the probes time out
        rounds = list(await asyncio.gather(*(run_at(i * confirm.interval) for i in range(runs))))
    else:  # starts spread over the window; done at the first try that no longer fails
        loop = asyncio.get_running_loop()
        begin, step = loop.time(), confirm.window / (runs - 1) if runs > 1 else 0.0
        rounds = []
        for i in range(runs):
            rounds.append(await run_at(max(0.0, begin + i * step - loop.time())))
            if not some_probe_failed_every_time(rounds):
                break
    last = {k: _probe_json(r) for k, r in rounds[-1].items()}
    for probe in probes:
        tries = [r[probe.name] for r in rounds]
        if all(not r.success for r in tries):
            reasons = {r.reason for r in tries}
            escalate = f"probe_{next(iter(reasons))}" if len(reasons) == 1 and reasons <= ESCALATING_REASONS else ""
            return True, last, escalate
    return False, last, ""


def _specific(ctx: ActionContext, service: str, alertname: str, labels: Mapping[str, str],
              procs: list[ProcessInfo], now: float) -> tuple[bool | None, str]:
    """The condition of alerts about files, ports, disks and resources (blocking)."""
    cfg = ctx.config.services[service]
    config = ctx.config
    if alertname in ("CaretakerFileCorrupt", "CaretakerFileMissing"):
        bad = []
        for spec in cfg.files:
            path = config.resolve(spec.path)
            if labels.get("path") not in (None, "", spec.path, str(path)):
                continue
            status = FileChecker(spec, path).check(now)
            if not status.exists or status.valid is False:  # None: not checked, not proven corrupt
                bad.append(f"{spec.path}: {status.detail or 'invalid'}")
        return bool(bad), "; ".join(bad) or "declared files exist and parse"
    if alertname == "CaretakerDirectoryMissing":
        bad = [d.path for d in cfg.directories if not check_directory(d, config.resolve(d.path)).ok]
        return bool(bad), f"not as declared: {', '.join(bad)}" if bad else "directories as declared"
    if alertname == "CaretakerDiskAlmostFull":
        low = []
        for p in cfg.data_paths:
            fs = filesystem(config.resolve(p))
            if fs is not None and fs[1] and fs[0] / fs[1] < DISK_FREE_RATIO:
                low.append(f"{p}: {fs[0] / fs[1]:.1%} free")
        return bool(low), "; ".join(low) or f"every data path has {DISK_FREE_RATIO:.0%} free or more"
    if alertname == "CaretakerPortConflict":
        statuses = check_ports(cfg.ports, [p.pid for p in procs], ctx.reader.root)
        held = [f"port {port} held by pid {s.holder_pid} ({s.holder_comm})" for port, s in statuses.items()
                if s.conflict]
        return bool(held), "; ".join(held) or "no declared port is held by another process"
    if alertname == "CaretakerMemoryAboveLimit" and cfg.limits.memory_bytes:
        rss = sum(p.rss_bytes for p in procs)
        return rss > cfg.limits.memory_bytes, f"resident memory {rss} bytes, limit {cfg.limits.memory_bytes}"
    if alertname == "CaretakerFdExhaustion" and cfg.limits.open_fds:
        most = max((ctx.reader.open_fds(p.pid) or 0 for p in procs), default=0)
        return most > FD_RATIO * cfg.limits.open_fds, f"at most {most} open fds in a process, limit " \
                                                      f"{cfg.limits.open_fds}"
    if alertname == "CaretakerHeartbeatMissing":
        return heartbeats.late(config, service, labels.get("heartbeat"), now)
    if alertname == "CaretakerClaimsOrphaned" and cfg.claims is not None:
        return orphaned_now(cfg.claims, config.base_dir, ctx.reader)
    return None, f"{alertname or 'this alert'}: its condition cannot be observed by the receiver"


async def observe(ctx: ActionContext, service: str, alertname: str = "", labels: Mapping[str, str] | None = None,
                  clock: Callable[[], float] = time.time) -> Observation:
    """Look at ``service`` now, and at the condition of the alert ``alertname``.

    Never raises for what it finds (a probe that errs is a failing probe). Takes up to
    about ``probe timeout + (probe_failures - 1) * interval`` seconds for a probe alert.
    """
    cfg = ctx.config.services[service]
    labels = labels or {}
    procs = await find_processes(ctx, service)
    n = len(procs)
    low, high = cfg.processes.min, cfg.processes.max
    in_range = low <= n <= high
    down = n < low
    obs = Observation(n, (low, high), False, None, "", pids=[p.pid for p in procs])
    counted = f"{n} processes, expected {low}..{high}"
    if alertname == "CaretakerServiceDown":
        obs.holds, obs.condition = down, counted
    elif alertname == "CaretakerServiceDuplicated":
        obs.holds, obs.condition = n > high, counted
    elif alertname == "CaretakerProbeFailing" and down:
        obs.holds, obs.condition = True, f"down: {counted}"
    elif alertname == "CaretakerProbeFailing":
        name = labels.get("probe") or None
        stopped = bool(procs) and all(p.state in "Tt" for p in procs)
        failing, obs.probes, obs.escalate = await _confirm_probe(ctx, service, name, stopped)
        confirm = ctx.config.receiver.confirm
        times = confirm.probe_failures
        over = "its processes are stopped (state T)" if stopped else f"over {confirm.window:g}s"
        obs.holds = failing
        obs.condition = (f"probe {name or 'of the service'} failed {times} times in a row, {over}" if failing
                         else f"probe {name or 'of the service'} passed within {times} tries")
        obs.healthy = in_range and not failing and all(p["success"] for p in obs.probes.values())
        return obs
    else:
        holds, what = await asyncio.to_thread(_specific, ctx, service, alertname, labels, procs, clock())
        if holds is None and alertname == "CaretakerHeartbeatMissing" and down:
            holds = True
        obs.holds, obs.condition = holds, what if not down else f"{what}; down: {counted}"
    if in_range and cfg.probes:
        results = await run_probes(cfg.probes, ctx.probes)
        obs.probes = {k: _probe_json(r) for k, r in results.items()}
        obs.healthy = all(r.success for r in results.values())
    else:
        obs.healthy = in_range
    return obs
