"""Collection (blocking work in a thread, probes concurrently) and exposition.

:class:`Scraper` gathers a :class:`Snapshot` within a deadline; :class:`ServiceCollector`
is a prometheus-client custom collector that renders the latest snapshot. It yields
fresh metric families on every ``collect()`` and does no I/O. Lines it emits, per configured
service (``service_name`` label), e.g.::

    caretaker_service_processes{service_name="redis"} 1.0
    caretaker_service_min_processes{service_name="redis"} 1.0
    caretaker_service_processes_by_status{service_name="redis",status="stopped"} 0.0
    caretaker_service_resident_memory_bytes{service_name="redis"} 4.194304e+06
    caretaker_service_cpu_seconds_total{service_name="redis"} 0.52
    caretaker_probe_success{probe="ping",service_name="redis",type="redis"} 1.0
    caretaker_probe_failure_reason{probe="ping",reason="timeout",service_name="redis",type="redis"} 0.0
    caretaker_heartbeat_last_timestamp_seconds{heartbeat="worker",service_name="worker"} 1.7637e+09
    caretaker_log_pattern_matches_total{pattern="python_traceback",service_name="api",severity="error"} 3.0
    caretaker_file_valid{path="/srv/app/state.json",service_name="api"} 1.0
    caretaker_filesystem_avail_bytes{path="/var/lib/redis",service_name="redis"} 5.2e+10
    caretaker_service_port_conflict{port="6379",service_name="redis"} 0.0
    caretaker_service_health_ratio{service_name="redis"} 1.0
    caretaker_service_health_component_ratio{component="processes",service_name="redis"} 1.0

Every series of a configured thing exists from the first scrape, 0 where nothing was found.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as CounterMetric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import health
from .config import Config
from .files import DirStatus, FileChecker, FileStatus, check_directory, filesystem
from .heartbeats import HeartbeatStore
from .logtail import LogFollower, patterns_for
from .probes import REASONS, ProbeContext, ProbeResult, run_probes
from .procfs import CpuAccountant, ProcessInfo, ProcessTable, ProcReader
from .sockets import PortStatus, check_ports, listening_table

__all__ = ["STATUSES", "Scraper", "ServiceCollector", "ServiceState", "Snapshot"]

log = logging.getLogger(__name__)

STATUSES = {"R": "running", "S": "sleeping", "D": "disk-sleep", "T": "stopped", "t": "tracing-stop",
            "I": "idle", "W": "waking", "P": "parked"}
"""proc(5) state letters named as psutil names them (``psutil.STATUS_*``)."""


@dataclass(frozen=True)
class Observed:
    """What the blocking pass saw of one service, besides its processes."""

    files: dict[str, FileStatus] = field(default_factory=dict)
    directories: dict[str, DirStatus] = field(default_factory=dict)
    filesystems: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    ports: dict[int, PortStatus] = field(default_factory=dict)
    heartbeats_alive: dict[str, bool] = field(default_factory=dict)
    """Per heartbeat: whether the process that fed it still runs (read from /proc)."""


@dataclass(frozen=True)
class ServiceState:
    processes: tuple[ProcessInfo, ...] = ()
    cpu_seconds_total: float = 0.0
    probes: dict[str, ProbeResult] = field(default_factory=dict)
    observed: Observed = field(default_factory=Observed)
    components: dict[str, float] = field(default_factory=dict)
    health: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    services: dict[str, ServiceState]
    duration_seconds: float = 0.0
    taken_at: float = 0.0


class Scraper:
    """Runs one collection at a time; concurrent callers share the one in progress."""

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
        self.snapshot: Snapshot | None = None
        self._probe_ctx: ProbeContext | None = None
        self._running: asyncio.Task[Snapshot] | None = None
        self._blocking: asyncio.Future[tuple[dict[str, list[ProcessInfo]], dict[str, Observed]]] | None = None
        self.errors = CounterMetric("caretaker_exporter_errors", "Collection problems, by reason.",
                                    ["reason"], registry=registry)
        for reason in ("scan_timeout", "scan_error", "log_error"):
            self.errors.labels(reason)
        self.scrape_duration = Gauge("caretaker_exporter_scrape_duration_seconds",
                                     "Duration of the last collection (process scan, checks and probes).",
                                     registry=registry)

    def close(self) -> None:
        for followers in self.followers.values():
            for f in followers:
                f.close()

    # --- the blocking pass (a thread) -----------------------------------------------
    def _observe_blocking(self) -> tuple[dict[str, list[ProcessInfo]], dict[str, Observed]]:
        scanned = self.table.scan()
        now = time.time()
        ports = listening_table(self.reader.root) if any(c.ports for c in self.config.services.values()) else {}
        observed = {}
        for name, cfg in self.config.services.items():
            for follower in self.followers[name]:
                try:
                    self.log_totals[name].update(follower.poll())
                except OSError as err:
                    self.errors.labels("log_error").inc()
                    log.warning("reading %s: %s", follower.path, err)
            pids = [p.pid for p in scanned[name]]
            observed[name] = Observed(
                files={path: checker.check(now) for path, checker in self.file_checkers[name].items()},
                directories={d.path: check_directory(d, self.config.resolve(d.path)) for d in cfg.directories},
                filesystems={p: filesystem(self.config.resolve(p)) for p in cfg.data_paths},
                ports=check_ports(cfg.ports, pids, self.reader.root, ports) if cfg.ports else {},
                heartbeats_alive={hb.name: self.heartbeats.process_alive(hb.name) for hb in cfg.heartbeats},
            )
        return scanned, observed

    async def _observe(self, deadline: float) -> tuple[dict[str, list[ProcessInfo]], dict[str, Observed]] | None:
        loop = asyncio.get_running_loop()
        if self._blocking is None or self._blocking.done():
            self._blocking = loop.run_in_executor(None, self._observe_blocking)
        try:
            return await asyncio.wait_for(asyncio.shield(self._blocking), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.errors.labels("scan_timeout").inc()
            log.warning("process scan did not finish within the scrape deadline")
        except OSError as err:
            self.errors.labels("scan_error").inc()
            log.error("process scan failed: %s", err)
        return None

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
        result = await blocking
        previous = self.snapshot.services if self.snapshot else {}
        now = time.time()
        services: dict[str, ServiceState] = {}
        for name, cfg in self.config.services.items():
            probes = await probe_tasks[name]
            if result is not None:
                procs = tuple(result[0][name])
                observed = result[1][name]
                cpu_total = self.cpu.update(name, procs)
            else:
                before = previous.get(name, ServiceState())
                procs, observed, cpu_total = before.processes, before.observed, self.cpu.total(name)
            integrity = ([f.ok for f in observed.files.values()] + [d.ok for d in observed.directories.values()]
                         + [not p.conflict for p in observed.ports.values()])
            beats = [self.heartbeats.healthy(hb.name, hb.timeout, now, observed.heartbeats_alive.get(hb.name, False))
                     for hb in cfg.heartbeats]
            parts = health.components(cfg, procs, probes, integrity, beats)
            services[name] = ServiceState(procs, cpu_total, probes, observed, parts,
                                          health.score(parts, self.config.weights_for(name)))
        duration = time.monotonic() - started
        self.scrape_duration.set(duration)
        self.snapshot = Snapshot(services, duration, time.time())
        return self.snapshot


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=["service_name", *labels])


class ServiceCollector(Collector):
    """Renders :attr:`Scraper.snapshot`; before any collection, every series is 0."""

    def __init__(self, scraper: Scraper) -> None:
        self.scraper = scraper

    def collect(self) -> Iterator[Metric]:
        scraper = self.scraper
        config = scraper.config
        snap = scraper.snapshot
        states = snap.services if snap else {}
        processes = _gauge("caretaker_service_processes", "Processes of the service now running.")
        min_p = _gauge("caretaker_service_min_processes", "Fewest processes expected (config).")
        max_p = _gauge("caretaker_service_max_processes", "Most processes expected (config).")
        by_status = _gauge("caretaker_service_processes_by_status",
                           "Processes of the service by scheduler status (psutil names).", "status")
        rss = _gauge("caretaker_service_resident_memory_bytes", "Resident set size summed over the processes.")
        mem_limit = _gauge("caretaker_service_memory_limit_bytes", "Configured memory limit (limits.memory_bytes).")
        cpu = CounterMetricFamily("caretaker_service_cpu_seconds",
                                  "User and system CPU time used by the service's processes.", labels=["service_name"])
        fds = _gauge("caretaker_service_open_fds", "Open file descriptors summed over the service's processes.")
        max_fds = _gauge("caretaker_service_max_open_fds_per_process",
                         "Most open file descriptors of any one of the service's processes.")
        fd_limit = _gauge("caretaker_service_open_fds_limit", "Configured fd limit per process (limits.open_fds).")
        oldest = _gauge("caretaker_service_oldest_start_time_seconds",
                        "Start time of the service's oldest process, Unix seconds; 0 when none.")
        p_success = _gauge("caretaker_probe_success", "1 when the probe passed in the last collection.",
                           "probe", "type")
        p_duration = _gauge("caretaker_probe_duration_seconds", "How long the probe took.", "probe", "type")
        p_reason = _gauge("caretaker_probe_failure_reason", "1 for the reason the probe failed, else 0.",
                          "probe", "type", "reason")
        p_cert = _gauge("caretaker_probe_tls_cert_expiry_timestamp_seconds",
                        "notAfter of the server certificate an https probe saw, Unix seconds; 0 unknown.",
                        "probe")
        hb_last = _gauge("caretaker_heartbeat_last_timestamp_seconds", "Last heartbeat, Unix seconds; 0 never.",
                         "heartbeat")
        hb_timeout = _gauge("caretaker_heartbeat_timeout_seconds", "Heartbeat timeout (config).", "heartbeat")
        hb_fail = _gauge("caretaker_heartbeat_last_failure_timestamp_seconds",
                         "Last failure reported by the app, Unix seconds; 0 never.", "heartbeat")
        hb_pid = _gauge("caretaker_heartbeat_pid", "Pid that last reported the heartbeat; 0 none.", "heartbeat")
        hb_alive = _gauge("caretaker_heartbeat_process_alive",
                          "1 when the process that reported the heartbeat still runs.", "heartbeat")
        logs = CounterMetricFamily("caretaker_log_pattern_matches", "Log lines matching the pattern.",
                                   labels=["service_name", "pattern", "severity"])
        f_exists = _gauge("caretaker_file_exists", "1 when the declared file exists.", "path")
        f_valid = _gauge("caretaker_file_valid", "1 when the file parses as its declared format, 0 when it does not, "
                         "NaN when it could not be checked (not a regular file, over max_parse_bytes).", "path")
        f_mtime = _gauge("caretaker_file_mtime_timestamp_seconds", "Last modification, Unix seconds.", "path")
        f_size = _gauge("caretaker_file_size_bytes", "Size of the file.", "path")
        f_attrs = _gauge("caretaker_file_attributes_match", "1 when mode/owner/group are as declared.", "path")
        f_age = _gauge("caretaker_file_max_age_seconds", "Declared max_age; 0 when none.", "path")
        d_exists = _gauge("caretaker_directory_exists", "1 when the declared directory exists.", "path")
        d_attrs = _gauge("caretaker_directory_attributes_match", "1 when the mode is as declared.", "path")
        fs_avail = _gauge("caretaker_filesystem_avail_bytes",
                          "Bytes available to unprivileged users on the filesystem of the path.", "path")
        fs_size = _gauge("caretaker_filesystem_size_bytes", "Size of the filesystem of the path.", "path")
        port_listen = _gauge("caretaker_service_port_listening", "1 when something listens on the port.", "port")
        port_conflict = _gauge("caretaker_service_port_conflict",
                               "1 when the port is held by a process that is not the service.", "port")
        port_holder = _gauge("caretaker_service_port_holder_info",
                             "The process holding the service's port in a conflict (value 1).", "port", "pid", "comm")
        h_ratio = _gauge("caretaker_service_health_ratio", "Composite health of the service, 0 to 1.")
        h_parts = _gauge("caretaker_service_health_component_ratio", "Parts of the health score, 0 to 1.",
                         "component")
        for name, cfg in config.services.items():
            state = states.get(name) or ServiceState(components=health.components(
                cfg, (), {}, [False] * (len(cfg.files) + len(cfg.directories) + len(cfg.ports)),
                [False] * len(cfg.heartbeats)))
            procs = state.processes
            processes.add_metric([name], len(procs))
            min_p.add_metric([name], cfg.processes.min)
            max_p.add_metric([name], cfg.processes.max)
            counts = dict.fromkeys(STATUSES.values(), 0)
            for p in procs:
                counts[STATUSES.get(p.state, "running")] += 1
            for status, n in counts.items():
                by_status.add_metric([name, status], n)
            rss.add_metric([name], sum(p.rss_bytes for p in procs))
            if cfg.limits.memory_bytes is not None:
                mem_limit.add_metric([name], cfg.limits.memory_bytes)
            cpu.add_metric([name], state.cpu_seconds_total)
            fds.add_metric([name], sum(p.open_fds or 0 for p in procs))
            max_fds.add_metric([name], max((p.open_fds or 0 for p in procs), default=0))
            if cfg.limits.open_fds is not None:
                fd_limit.add_metric([name], cfg.limits.open_fds)
            oldest.add_metric([name], min((p.start_time_seconds for p in procs), default=0.0))
            for probe in cfg.probes:
                r = state.probes.get(probe.name)
                labels = [name, probe.name, probe.type]
                p_success.add_metric(labels, 1.0 if r and r.success else 0.0)
                p_duration.add_metric(labels, r.duration_seconds if r else 0.0)
                for reason in REASONS:
                    p_reason.add_metric([*labels, reason], 1.0 if r and r.reason == reason else 0.0)
                if probe.type == "http" and probe.url.startswith("https:"):
                    p_cert.add_metric([name, probe.name], (r.cert_expiry_seconds or 0.0) if r else 0.0)
            for hb in cfg.heartbeats:
                hb_state = scraper.heartbeats.states[hb.name]
                hb_last.add_metric([name, hb.name], hb_state.last_seen)
                hb_timeout.add_metric([name, hb.name], hb.timeout)
                hb_fail.add_metric([name, hb.name], hb_state.last_failure)
                hb_pid.add_metric([name, hb.name], hb_state.pid)
                hb_alive.add_metric([name, hb.name], 1.0 if state.observed.heartbeats_alive.get(hb.name) else 0.0)
            totals = scraper.log_totals[name]
            for pattern, severity in scraper.log_patterns[name]:
                logs.add_metric([name, pattern, severity], totals[pattern])
            for f in cfg.files:
                fs = state.observed.files.get(f.path) or FileStatus(False, False)
                f_exists.add_metric([name, f.path], fs.exists)
                f_valid.add_metric([name, f.path], math.nan if fs.exists and fs.valid is None
                                   else float(fs.exists and bool(fs.valid)))
                f_mtime.add_metric([name, f.path], fs.mtime)
                f_size.add_metric([name, f.path], fs.size)
                f_attrs.add_metric([name, f.path], fs.exists and fs.attributes_ok)
                f_age.add_metric([name, f.path], f.max_age or 0.0)
            for d in cfg.directories:
                ds = state.observed.directories.get(d.path) or DirStatus(False, False)
                d_exists.add_metric([name, d.path], ds.exists)
                d_attrs.add_metric([name, d.path], ds.attributes_ok)
            for path in cfg.data_paths:
                space = state.observed.filesystems.get(path)
                fs_avail.add_metric([name, path], space[0] if space else 0)
                fs_size.add_metric([name, path], space[1] if space else 0)
            for port in cfg.ports:
                ps = state.observed.ports.get(port) or PortStatus(False, False)
                port_listen.add_metric([name, str(port)], ps.listening)
                port_conflict.add_metric([name, str(port)], ps.conflict)
                if ps.conflict:
                    port_holder.add_metric([name, str(port), str(ps.holder_pid), ps.holder_comm], 1)
            h_ratio.add_metric([name], state.health)
            for component, value in state.components.items():
                h_parts.add_metric([name, component], value if snap else 0.0)
        yield from (processes, min_p, max_p, by_status, rss, mem_limit, cpu, fds, max_fds, fd_limit, oldest,
                    p_success, p_duration, p_reason, p_cert, hb_last, hb_timeout, hb_fail, hb_pid, hb_alive, logs,
                    f_exists, f_valid, f_mtime, f_size, f_attrs, f_age, d_exists, d_attrs, fs_avail, fs_size,
                    port_listen, port_conflict, port_holder, h_ratio, h_parts)
