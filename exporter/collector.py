"""Collection: the blocking work in a thread, probes concurrently, within a deadline.

:class:`Scraper` takes a :class:`~exporter.snapshot.Snapshot` per collection and
registers the collectors that render it (:mod:`exporter.metrics`): one collection
per scrape, shared by concurrent scrapes. Whatever changes between collections (CPU
totals, log pattern totals, heartbeats, its own error counts) is copied into the
snapshot when it is taken; the collectors read nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from . import health, metrics
from .claims import ClaimsSeen, ClaimsWatch
from .config import Config
from .files import FileChecker, check_directory, filesystem
from .heartbeats import HeartbeatStore
from .logtail import LogFollower, patterns_for
from .probes import ProbeContext, run_probes
from .procfs import CpuAccountant, ProcessInfo, ProcessTable, ProcReader
from .snapshot import ERROR_REASONS, LogMatches, Observed, ServiceState, Snapshot
from .sockets import check_ports, listening_table

__all__ = ["Scraper", "ServiceState", "Snapshot"]

log = logging.getLogger(__name__)

_Pass = tuple[dict[str, list[ProcessInfo]], dict[str, Observed]]
"""What the blocking pass returns: each service's processes, and the rest it saw."""


class Scraper:
    """Runs one collection at a time; concurrent callers share the one in progress.

    ``registry`` gets the collectors of :mod:`exporter.metrics`, rendering
    :attr:`snapshot` (before the first collection: every series at 0).
    """

    def __init__(self, config: Config, registry: CollectorRegistry, reader: ProcReader | None = None,
                 session: aiohttp.ClientSession | None = None, heartbeats: HeartbeatStore | None = None,
                 logs_from_start: bool = False) -> None:
        self.config = config
        self.reader = reader or ProcReader()
        self.session = session
        self.cpu = CpuAccountant()
        self.table = ProcessTable(self.reader, config.services, (os.getpid(),))
        self.heartbeats = heartbeats or HeartbeatStore(
            config.resolve(config.exporter.state_file),
            [hb.name for cfg in config.services.values() for hb in cfg.heartbeats], self.reader)
        self.followers = {name: [LogFollower(config.resolve(w.path), patterns_for(w),
                                             config.exporter.log_read_limit_bytes, from_start=logs_from_start)
                                 for w in cfg.logs] for name, cfg in config.services.items()}
        self.log_totals: dict[str, Counter[str]] = {name: Counter() for name in config.services}
        self.log_patterns: dict[str, list[tuple[str, str]]] = {
            name: list({p.name: (p.name, p.severity) for f in self.followers[name] for p in f.patterns}.values())
            for name in config.services}
        """Per service, every (pattern, severity) its logs are searched for: computed once."""
        self.file_checkers = {name: {f.path: FileChecker(f, config.resolve(f.path)) for f in cfg.files}
                              for name, cfg in config.services.items()}
        self.errors: Counter[str] = Counter(dict.fromkeys(ERROR_REASONS, 0))
        self.claims = {name: ClaimsWatch(name, cfg.claims, config.base_dir, self.reader)
                       for name, cfg in config.services.items() if cfg.claims is not None}
        self._claims_scans: dict[str, asyncio.Future[ClaimsSeen]] = {}
        self._claims_threads = {name: ThreadPoolExecutor(1, thread_name_prefix=f"caretaker-claims-{name}")
                                for name in self.claims}
        """One thread per service's claims scans: a Redis that does not answer holds that
        thread only, never the default executor that the process scan and the heartbeat
        endpoint use (its thread is started with the first scan)."""
        self.snapshot = self._first_snapshot(time.time())
        self._probe_ctx: ProbeContext | None = None
        self._running: asyncio.Task[Snapshot] | None = None
        self._blocking: asyncio.Future[_Pass] | None = None
        metrics.register(registry, self.latest)

    def latest(self) -> Snapshot:
        """The last snapshot taken (what ``/metrics`` shows)."""
        return self.snapshot

    def _first_snapshot(self, now: float) -> Snapshot:
        """Every series at 0 (health parts included) until the first collection."""
        services = {}
        for name, cfg in self.config.services.items():
            parts = health.components(cfg, (), {}, [False] * (len(cfg.files) + len(cfg.directories) + len(cfg.ports)),
                                      [False] * len(cfg.heartbeats))
            services[name] = ServiceState(
                observed=Observed(log_matches=self._log_matches(name)),
                heartbeats={hb.name: dataclasses.replace(self.heartbeats.states[hb.name]) for hb in cfg.heartbeats},
                components=dict.fromkeys(parts, 0.0), **self._claims_state(name, ClaimsSeen()))
        return Snapshot(self.config, services, errors=dict(self.errors), errors_since=now)

    def _claims_state(self, name: str, seen: ClaimsSeen) -> dict[str, Any]:
        """``ServiceState``'s claims fields: none for a service without ``claims:``."""
        watch = self.claims.get(name)
        return {} if watch is None else {"claims": seen, "claims_errors": dict(watch.errors)}

    def close(self) -> None:
        for followers in self.followers.values():
            for f in followers:
                f.close()
        for threads in self._claims_threads.values():
            threads.shutdown(wait=False, cancel_futures=True)  # a scan in progress ends within claims.timeout
        for watch in self.claims.values():
            watch.close()

    def _log_matches(self, name: str) -> tuple[LogMatches, ...]:
        totals = self.log_totals[name]
        return tuple(LogMatches(pattern, severity, totals[pattern]) for pattern, severity in self.log_patterns[name])

    # --- the blocking pass (a thread) -----------------------------------------------
    def _observe_blocking(self) -> _Pass:
        scanned = self.table.scan()
        now = time.time()
        ports = listening_table(self.reader.root) if any(c.ports for c in self.config.services.values()) else {}
        observed = {}
        for name, cfg in self.config.services.items():
            for follower in self.followers[name]:
                try:
                    self.log_totals[name].update(follower.poll())
                except OSError as err:
                    self.errors["log_error"] += 1
                    log.warning("reading %s: %s", follower.path, err)
            pids = [p.pid for p in scanned[name]]
            observed[name] = Observed(
                files={path: checker.check(now) for path, checker in self.file_checkers[name].items()},
                directories={d.path: check_directory(d, self.config.resolve(d.path)) for d in cfg.directories},
                filesystems={p: filesystem(self.config.resolve(p)) for p in cfg.data_paths},
                ports=check_ports(cfg.ports, pids, self.reader.root, ports) if cfg.ports else {},
                heartbeats_alive={hb.name: self.heartbeats.process_alive(hb.name) for hb in cfg.heartbeats},
                log_matches=self._log_matches(name),
            )
        return scanned, observed

    async def _observe(self, deadline: float) -> _Pass | None:
        loop = asyncio.get_running_loop()
        if self._blocking is None or self._blocking.done():
            self._blocking = loop.run_in_executor(None, self._observe_blocking)
        try:
            return await asyncio.wait_for(asyncio.shield(self._blocking), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.errors["scan_timeout"] += 1
            log.warning("process scan did not finish within the scrape deadline")
        except OSError as err:
            self.errors["scan_error"] += 1
            log.error("process scan failed: %s", err)
        return None

    async def _scan_claims(self, name: str, deadline: float) -> ClaimsSeen:
        """The service's claims, scanned in the service's own thread, at most one scan at a
        time (a scrape while one runs waits for it), as seen at ``deadline``. A scan that is
        not done by then goes on (within ``claims.timeout``), counts itself as a timeout and
        serves the next scrape (:meth:`ClaimsWatch.scan`)."""
        watch = self.claims[name]
        scan = self._claims_scans.get(name)
        if scan is None or scan.done():
            scan = self._claims_scans[name] = asyncio.get_running_loop().run_in_executor(
                self._claims_threads[name], watch.scan, deadline)
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(scan), max(0.0, deadline - time.monotonic()))
        return watch.seen

    # --- one collection -----------------------------------------------------------------
    async def collect(self, deadline_seconds: float) -> Snapshot:
        """A fresh snapshot, gathered within ``deadline_seconds`` (a timed-out scan
        leaves the previous view in place and is counted as an error)."""
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._collect(deadline_seconds))
        return await asyncio.shield(self._running)

    async def _collect(self, deadline_seconds: float) -> Snapshot:
        started = time.monotonic()
        deadline = started + deadline_seconds
        session = self.session
        assert session is not None, "Scraper.session must be set before collecting"
        blocking = asyncio.create_task(self._observe(deadline))
        if self._probe_ctx is None or self._probe_ctx.session is not session:
            self._probe_ctx = ProbeContext(session, self.config.base_dir)
        probe_ctx = self._probe_ctx
        probe_tasks = {name: asyncio.create_task(run_probes(cfg.probes, probe_ctx, deadline_seconds))
                       for name, cfg in self.config.services.items()}
        claims_tasks = {name: asyncio.create_task(self._scan_claims(name, deadline)) for name in self.claims}
        result = await blocking
        previous = self.snapshot.services
        now = time.time()
        services: dict[str, ServiceState] = {}
        for name, cfg in self.config.services.items():
            probes = await probe_tasks[name]
            if result is not None:
                procs = tuple(result[0][name])
                observed = result[1][name]
                cpu_total = self.cpu.update(name, procs)
            else:
                before = previous[name]
                procs, observed, cpu_total = before.processes, before.observed, self.cpu.total(name)
            integrity = ([f.ok for f in observed.files.values()] + [d.ok for d in observed.directories.values()]
                         + [not p.conflict for p in observed.ports.values()])
            fed = {hb.name: dataclasses.replace(self.heartbeats.states[hb.name]) for hb in cfg.heartbeats}
            beats = [self.heartbeats.healthy(hb.name, hb.timeout, now, observed.heartbeats_alive.get(hb.name, False))
                     for hb in cfg.heartbeats]
            parts = health.components(cfg, procs, probes, integrity, beats)
            claims = await claims_tasks[name] if name in claims_tasks else ClaimsSeen()
            services[name] = ServiceState(procs, cpu_total, probes, observed, fed, parts,
                                          health.score(parts, self.config.weights_for(name)),
                                          **self._claims_state(name, claims))
        self.snapshot = Snapshot(self.config, services, time.monotonic() - started, time.time(),
                                 dict(self.errors), self.snapshot.errors_since)
        return self.snapshot
