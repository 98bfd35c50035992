"""What one collection saw: the :class:`Snapshot` the exporter's collectors render.

A snapshot is complete and does not change: it has a :class:`ServiceState` for every
configured service (empty where nothing was found), and copies of what changes
between collections (heartbeats as fed, log pattern totals, the exporter's own
error counts), so that rendering it (:mod:`exporter.metrics`) or printing it
(``--once``) needs nothing else, and a test can build one by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .claims import ClaimsSeen
from .config import Config
from .files import DirStatus, FileStatus
from .heartbeats import HeartbeatState
from .probes import ProbeResult
from .procfs import ProcessInfo
from .sockets import PortStatus

__all__ = ["ERROR_REASONS", "LogMatches", "Observed", "ServiceState", "Snapshot"]

ERROR_REASONS = ("scan_timeout", "scan_error", "log_error")
"""Why a collection went wrong (``caretaker_exporter_errors_total{reason}``)."""


class LogMatches(NamedTuple):
    """Lines of a service's logs that matched one pattern since the exporter started."""

    pattern: str
    severity: str
    total: int


@dataclass(frozen=True)
class Observed:
    """What the blocking pass saw of one service, besides its processes."""

    files: dict[str, FileStatus] = field(default_factory=dict)
    directories: dict[str, DirStatus] = field(default_factory=dict)
    filesystems: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    """Per data path: ``(avail_bytes, size_bytes)`` of its filesystem, None unknown."""
    ports: dict[int, PortStatus] = field(default_factory=dict)
    heartbeats_alive: dict[str, bool] = field(default_factory=dict)
    """Per heartbeat: whether the process that fed it still runs (read from /proc)."""
    log_matches: tuple[LogMatches, ...] = ()
    """Every pattern the service's logs are searched for, with its total (0 included)."""


@dataclass(frozen=True)
class ServiceState:
    processes: tuple[ProcessInfo, ...] = ()
    cpu_seconds_total: float = 0.0
    """CPU seconds of the service's processes, never going backwards (:class:`~exporter.procfs.CpuAccountant`)."""
    probes: dict[str, ProbeResult] = field(default_factory=dict)
    observed: Observed = field(default_factory=Observed)
    heartbeats: dict[str, HeartbeatState] = field(default_factory=dict)
    """Each of the service's heartbeats as fed when the snapshot was taken."""
    components: dict[str, float] = field(default_factory=dict)
    health: float = 0.0
    claims: ClaimsSeen | None = None
    """The last scan of the service's claims that finished; ``None`` without ``claims:``."""
    claims_errors: dict[str, int] = field(default_factory=dict)
    """Scans of its claims that failed since the exporter started, by reason (every
    reason of :data:`~exporter.claims.SCAN_ERROR_REASONS` a key, with ``claims:``)."""


@dataclass(frozen=True)
class Snapshot:
    config: Config
    services: dict[str, ServiceState]
    """Every configured service."""
    duration_seconds: float = 0.0
    taken_at: float = 0.0
    """Unix time; 0 for the snapshot that stands before the first collection."""
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_REASONS, 0))
    """Collection problems since the exporter started, by reason (every reason a key)."""
    errors_since: float = 0.0
    """Unix time the error counts started from."""
