"""The composite health score of a service (0-1) and its parts.

Each part ("component") is a ratio from 0 (all wrong) to 1 (all fine):

- ``processes``: 1 when ``min <= n <= max``; ``n/min`` below min; ``max/n`` above max.
- ``probes``: the share of probes that passed (only when the service has probes).
- ``resources``: the share of configured limits (memory, fds) that are respected
  (only when the service has limits); 0 when no process runs, since nothing that
  does not run is healthy.
- ``integrity``: the share of declared files (exist, parse, fresh, mode/owner),
  directories and ports (no other process holds them) that are as they should be.
- ``heartbeats``: the share of the service's heartbeats fed in time, not failed since,
  whose reporting process (if any) still runs.

The score is the weighted mean of the parts that apply, with the weights from the
config (defaults: processes 30, probes 25, resources 20, integrity 15,
heartbeats 10). A part that does not apply is neither exported nor weighed, so a
service without probes is not called healthy just because nothing probed it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config import HealthWeights, ServiceConfig
from .probes import ProbeResult
from .procfs import ProcessInfo

__all__ = ["components", "score"]


def _processes_ratio(n: int, low: int, high: int) -> float:
    if n < low:
        return n / low
    if n > high:
        return high / n if n else 1.0
    return 1.0


def components(cfg: ServiceConfig, processes: Sequence[ProcessInfo], probes: Mapping[str, ProbeResult],
               integrity: Sequence[bool] = (), heartbeats: Sequence[bool] = ()) -> dict[str, float]:
    """The parts that apply to this service, each 0-1."""
    parts = {"processes": _processes_ratio(len(processes), cfg.processes.min, cfg.processes.max)}
    if cfg.probes:
        passed = sum(1 for p in cfg.probes if (r := probes.get(p.name)) is not None and r.success)
        parts["probes"] = passed / len(cfg.probes)
    checks = []
    if cfg.limits.memory_bytes is not None:
        checks.append(sum(p.rss_bytes for p in processes) <= cfg.limits.memory_bytes)
    if cfg.limits.open_fds is not None:
        checks.append(all((p.open_fds or 0) <= cfg.limits.open_fds for p in processes))
    if checks:
        parts["resources"] = sum(checks) / len(checks) if processes else 0.0
    if integrity:
        parts["integrity"] = sum(integrity) / len(integrity)
    if heartbeats:
        parts["heartbeats"] = sum(heartbeats) / len(heartbeats)
    return parts


def score(parts: Mapping[str, float], weights: HealthWeights) -> float:
    """Weighted mean of ``parts``; 0 when every applicable weight is 0 and a part is 0."""
    weight: dict[str, float] = weights.model_dump()
    total = sum(weight[name] for name in parts)
    if total <= 0:
        return min(parts.values(), default=1.0)
    return sum(weight[name] * value for name, value in parts.items()) / total
