"""The exporter's metrics: one prometheus-client custom collector per concern.

Each collector renders the latest :class:`~exporter.snapshot.Snapshot` (``latest()``
returns it; before the first collection, one with every series at 0). ``collect()``
yields fresh metric families on every call, reads nothing but that snapshot and does
no I/O; its docstring shows the lines it emits. Every series of a configured thing
exists from the first scrape, 0 where nothing was found. The label for the service is
``service_name``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .files import DirStatus, FileStatus
from .probes import REASONS
from .snapshot import Snapshot
from .sockets import PortStatus

__all__ = [
    "STATUSES",
    "ClaimsCollector",
    "ExporterCollector",
    "FileCollector",
    "HealthCollector",
    "HeartbeatCollector",
    "LogCollector",
    "PortCollector",
    "ProbeCollector",
    "ProcessCollector",
    "register",
]

STATUSES = {"R": "running", "S": "sleeping", "D": "disk-sleep", "T": "stopped", "t": "tracing-stop",
            "I": "idle", "W": "waking", "P": "parked"}
"""proc(5) state letters named as psutil names them (``psutil.STATUS_*``)."""


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=["service_name", *labels])


class SnapshotCollector(Collector):
    """Renders part of the snapshot ``latest()`` returns."""

    def __init__(self, latest: Callable[[], Snapshot]) -> None:
        self.latest = latest


class ExporterCollector(SnapshotCollector):
    """The exporter's own work::

        caretaker_exporter_errors_total{reason="scan_timeout"} 0.0
        caretaker_exporter_errors_created{reason="scan_timeout"} 1.7637e+09
        caretaker_exporter_scrape_duration_seconds 0.0132

    ``reason``: ``scan_timeout``, ``scan_error``, ``log_error``.
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        errors = CounterMetricFamily("caretaker_exporter_errors", "Collection problems, by reason.", labels=["reason"])
        for reason, count in snap.errors.items():
            errors.add_metric([reason], count, created=snap.errors_since)
        yield errors
        yield GaugeMetricFamily("caretaker_exporter_scrape_duration_seconds",
                                "Duration of the last collection (process scan, checks and probes).",
                                value=snap.duration_seconds)


class ProcessCollector(SnapshotCollector):
    """The service's processes and what they use::

        caretaker_service_processes{service_name="redis"} 1.0
        caretaker_service_min_processes{service_name="redis"} 1.0
        caretaker_service_max_processes{service_name="redis"} 1.0
        caretaker_service_processes_by_status{service_name="redis",status="stopped"} 0.0
        caretaker_service_resident_memory_bytes{service_name="redis"} 4.194304e+06
        caretaker_service_memory_limit_bytes{service_name="redis"} 2e+09
        caretaker_service_cpu_seconds_total{service_name="redis"} 0.52
        caretaker_service_open_fds{service_name="redis"} 12.0
        caretaker_service_max_open_fds_per_process{service_name="redis"} 12.0
        caretaker_service_open_fds_limit{service_name="redis"} 1000.0
        caretaker_service_oldest_start_time_seconds{service_name="redis"} 1.7637e+09

    ``processes_by_status`` has one series per status of :data:`STATUSES`; the
    ``_limit`` series only where ``limits`` declares one.
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
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
        for name, cfg in snap.config.services.items():
            state = snap.services[name]
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
        yield from (processes, min_p, max_p, by_status, rss, mem_limit, cpu, fds, max_fds, fd_limit, oldest)


class ProbeCollector(SnapshotCollector):
    """The last result of each probe::

        caretaker_probe_success{probe="ping",service_name="redis",type="redis"} 1.0
        caretaker_probe_duration_seconds{probe="ping",service_name="redis",type="redis"} 0.0011
        caretaker_probe_failure_reason{probe="ping",reason="timeout",service_name="redis",type="redis"} 0.0
        caretaker_probe_tls_cert_expiry_timestamp_seconds{probe="web",service_name="api"} 1.7896e+09

    ``failure_reason`` has one series per reason of :data:`~exporter.probes.REASONS`;
    the certificate's notAfter only for https probes (0 while unknown).
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        success = _gauge("caretaker_probe_success", "1 when the probe passed in the last collection.",
                         "probe", "type")
        duration = _gauge("caretaker_probe_duration_seconds", "How long the probe took.", "probe", "type")
        reasons = _gauge("caretaker_probe_failure_reason", "1 for the reason the probe failed, else 0.",
                         "probe", "type", "reason")
        cert = _gauge("caretaker_probe_tls_cert_expiry_timestamp_seconds",
                      "notAfter of the server certificate an https probe saw, Unix seconds; 0 unknown.", "probe")
        for name, cfg in snap.config.services.items():
            results = snap.services[name].probes
            for probe in cfg.probes:
                r = results.get(probe.name)
                labels = [name, probe.name, probe.type]
                success.add_metric(labels, 1.0 if r and r.success else 0.0)
                duration.add_metric(labels, r.duration_seconds if r else 0.0)
                for reason in REASONS:
                    reasons.add_metric([*labels, reason], 1.0 if r and r.reason == reason else 0.0)
                if probe.type == "http" and probe.url.startswith("https:"):
                    cert.add_metric([name, probe.name], (r.cert_not_after or 0.0) if r else 0.0)
        yield from (success, duration, reasons, cert)


class HeartbeatCollector(SnapshotCollector):
    """The heartbeats apps feed (``POST /heartbeat/NAME``)::

        caretaker_heartbeat_last_timestamp_seconds{heartbeat="worker",service_name="worker"} 1.7637e+09
        caretaker_heartbeat_timeout_seconds{heartbeat="worker",service_name="worker"} 120.0
        caretaker_heartbeat_last_failure_timestamp_seconds{heartbeat="worker",service_name="worker"} 0.0
        caretaker_heartbeat_pid{heartbeat="worker",service_name="worker"} 4242.0
        caretaker_heartbeat_process_alive{heartbeat="worker",service_name="worker"} 1.0
        caretaker_heartbeat_beats_total{heartbeat="worker",service_name="worker"} 5120.0

    ``beats_total`` counts the work-loop beats the app's reports vouched for
    (:mod:`caretaker_client`); it stays 0 for an app that feeds without proving progress.
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        last = _gauge("caretaker_heartbeat_last_timestamp_seconds", "Last heartbeat, Unix seconds; 0 never.",
                      "heartbeat")
        timeout = _gauge("caretaker_heartbeat_timeout_seconds", "Heartbeat timeout (config).", "heartbeat")
        failure = _gauge("caretaker_heartbeat_last_failure_timestamp_seconds",
                         "Last failure reported by the app, Unix seconds; 0 never.", "heartbeat")
        pid = _gauge("caretaker_heartbeat_pid", "Pid that last reported the heartbeat; 0 none.", "heartbeat")
        alive = _gauge("caretaker_heartbeat_process_alive",
                       "1 when the process that reported the heartbeat still runs.", "heartbeat")
        beats = CounterMetricFamily("caretaker_heartbeat_beats",
                                    "Work-loop beats the app's heartbeats vouched for; 0 for a plain feed.",
                                    labels=["service_name", "heartbeat"])
        for name, cfg in snap.config.services.items():
            state = snap.services[name]
            for hb in cfg.heartbeats:
                fed = state.heartbeats[hb.name]
                labels = [name, hb.name]
                last.add_metric(labels, fed.last_seen)
                timeout.add_metric(labels, hb.timeout)
                failure.add_metric(labels, fed.last_failure)
                pid.add_metric(labels, fed.pid)
                alive.add_metric(labels, 1.0 if state.observed.heartbeats_alive.get(hb.name) else 0.0)
                beats.add_metric(labels, fed.beats)
        yield from (last, timeout, failure, pid, alive, beats)


class LogCollector(SnapshotCollector):
    """Log lines matching each pattern the service's logs are searched for::

        caretaker_log_pattern_matches_total{pattern="python_traceback",service_name="api",severity="error"} 3.0
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        matches = CounterMetricFamily("caretaker_log_pattern_matches", "Log lines matching the pattern.",
                                      labels=["service_name", "pattern", "severity"])
        for name in snap.config.services:
            for pattern, severity, total in snap.services[name].observed.log_matches:
                matches.add_metric([name, pattern, severity], total)
        yield matches


class FileCollector(SnapshotCollector):
    """Declared files and directories, and the filesystems of the data paths::

        caretaker_file_exists{path="state.json",service_name="api"} 1.0
        caretaker_file_valid{path="state.json",service_name="api"} 1.0
        caretaker_file_mtime_timestamp_seconds{path="state.json",service_name="api"} 1.7637e+09
        caretaker_file_size_bytes{path="state.json",service_name="api"} 512.0
        caretaker_file_attributes_match{path="state.json",service_name="api"} 1.0
        caretaker_file_max_age_seconds{path="state.json",service_name="api"} 3600.0
        caretaker_directory_exists{path="uploads",service_name="api"} 1.0
        caretaker_directory_attributes_match{path="uploads",service_name="api"} 1.0
        caretaker_filesystem_avail_bytes{path="/var/lib/redis",service_name="redis"} 5.2e+10
        caretaker_filesystem_size_bytes{path="/var/lib/redis",service_name="redis"} 1.0e+11

    ``path`` is as the config gives it. ``file_valid`` is NaN for a file that could
    not be checked (not a regular file, over ``max_parse_bytes``).
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        exists = _gauge("caretaker_file_exists", "1 when the declared file exists.", "path")
        valid = _gauge("caretaker_file_valid", "1 when the file parses as its declared format, 0 when it does not, "
                       "NaN when it could not be checked (not a regular file, over max_parse_bytes).", "path")
        mtime = _gauge("caretaker_file_mtime_timestamp_seconds", "Last modification, Unix seconds.", "path")
        size = _gauge("caretaker_file_size_bytes", "Size of the file.", "path")
        attrs = _gauge("caretaker_file_attributes_match", "1 when mode/owner/group are as declared.", "path")
        max_age = _gauge("caretaker_file_max_age_seconds", "Declared max_age; 0 when none.", "path")
        d_exists = _gauge("caretaker_directory_exists", "1 when the declared directory exists.", "path")
        d_attrs = _gauge("caretaker_directory_attributes_match", "1 when the mode is as declared.", "path")
        fs_avail = _gauge("caretaker_filesystem_avail_bytes",
                          "Bytes available to unprivileged users on the filesystem of the path.", "path")
        fs_size = _gauge("caretaker_filesystem_size_bytes", "Size of the filesystem of the path.", "path")
        for name, cfg in snap.config.services.items():
            observed = snap.services[name].observed
            for f in cfg.files:
                fs = observed.files.get(f.path) or FileStatus(False, False)
                labels = [name, f.path]
                exists.add_metric(labels, fs.exists)
                valid.add_metric(labels, math.nan if fs.exists and fs.valid is None
                                 else float(fs.exists and bool(fs.valid)))
                mtime.add_metric(labels, fs.mtime)
                size.add_metric(labels, fs.size)
                attrs.add_metric(labels, fs.exists and fs.attributes_ok)
                max_age.add_metric(labels, f.max_age or 0.0)
            for d in cfg.directories:
                ds = observed.directories.get(d.path) or DirStatus(False, False)
                d_exists.add_metric([name, d.path], ds.exists)
                d_attrs.add_metric([name, d.path], ds.attributes_ok)
            for path in cfg.data_paths:
                space = observed.filesystems.get(path)
                fs_avail.add_metric([name, path], space[0] if space else 0)
                fs_size.add_metric([name, path], space[1] if space else 0)
        yield from (exists, valid, mtime, size, attrs, max_age, d_exists, d_attrs, fs_avail, fs_size)


class PortCollector(SnapshotCollector):
    """The service's declared ports (``ports:``)::

        caretaker_service_port_listening{port="6379",service_name="redis"} 1.0
        caretaker_service_port_conflict{port="6379",service_name="redis"} 1.0
        caretaker_service_port_holder_info{comm="python3",pid="4242",port="6379",service_name="redis"} 1.0

    ``port_holder_info`` only in a conflict: the process that holds the port.
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        listening = _gauge("caretaker_service_port_listening", "1 when something listens on the port.", "port")
        conflict = _gauge("caretaker_service_port_conflict",
                          "1 when the port is held by a process that is not the service.", "port")
        holder = _gauge("caretaker_service_port_holder_info",
                        "The process holding the service's port in a conflict (value 1).", "port", "pid", "comm")
        for name, cfg in snap.config.services.items():
            ports = snap.services[name].observed.ports
            for port in cfg.ports:
                ps = ports.get(port) or PortStatus(False, False)
                listening.add_metric([name, str(port)], ps.listening)
                conflict.add_metric([name, str(port)], ps.conflict)
                if ps.conflict:
                    holder.add_metric([name, str(port), str(ps.holder_pid), ps.holder_comm], 1)
        yield from (listening, conflict, holder)


class HealthCollector(SnapshotCollector):
    """The health score and its parts (:mod:`exporter.health`)::

        caretaker_service_health_ratio{service_name="redis"} 1.0
        caretaker_service_health_component_ratio{component="processes",service_name="redis"} 1.0

    One ``component`` series per part that applies to the service.
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        ratio = _gauge("caretaker_service_health_ratio", "Composite health of the service, 0 to 1.")
        parts = _gauge("caretaker_service_health_component_ratio", "Parts of the health score, 0 to 1.", "component")
        for name in snap.config.services:
            state = snap.services[name]
            ratio.add_metric([name], state.health)
            for component, value in state.components.items():
                parts.add_metric([name, component], value)
        yield from (ratio, parts)


class ClaimsCollector(SnapshotCollector):
    """Work items claimed in Redis, for services with ``claims:`` (:mod:`exporter.claims`)::

        caretaker_claims{service_name="worker",state="active"} 3.0
        caretaker_claims{service_name="worker",state="orphaned"} 1.0
        caretaker_claims{service_name="worker",state="invalid"} 0.0
        caretaker_claims_oldest_orphan_timestamp_seconds{service_name="worker"} 1.7637e+09
        caretaker_claims_last_scan_timestamp_seconds{service_name="worker"} 1.7647e+09
        caretaker_claims_scan_errors_total{reason="timeout",service_name="worker"} 0.0
        caretaker_claims_scan_errors_created{reason="timeout",service_name="worker"} 1.7637e+09

    As the last scan that finished found them (a failed scan leaves them as they were,
    and is counted); the oldest orphan's claim time is 0 when none is orphaned; the last
    scan's time is when the view shown was taken (0 until a scan succeeds).
    ``state``: :data:`~exporter.claims.STATES`; ``reason``:
    :data:`~exporter.claims.SCAN_ERROR_REASONS`.
    """

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        claims = _gauge("caretaker_claims", "Claimed work items by state: active (the owner lives), orphaned "
                        "(heartbeat gone and owner dead), invalid (cannot be judged).", "state")
        oldest = _gauge("caretaker_claims_oldest_orphan_timestamp_seconds",
                        "Claim time of the oldest orphaned claim, Unix seconds; 0 when none.")
        scanned = _gauge("caretaker_claims_last_scan_timestamp_seconds",
                         "When the last successful scan of the claims finished, Unix seconds; 0 before the first.")
        errors = CounterMetricFamily("caretaker_claims_scan_errors", "Scans of the claims that failed, by reason.",
                                     labels=["service_name", "reason"])
        for name in snap.config.services:
            state = snap.services[name]
            if state.claims is None:
                continue
            for claim_state, count in state.claims.counts().items():
                claims.add_metric([name, claim_state], count)
            oldest.add_metric([name], state.claims.oldest_orphan)
            scanned.add_metric([name], state.claims.scanned_at)
            for reason, count in state.claims_errors.items():
                errors.add_metric([name, reason], count, created=snap.errors_since)
        yield from (claims, oldest, scanned, errors)


COLLECTORS: tuple[type[SnapshotCollector], ...] = (
    ExporterCollector, ProcessCollector, ProbeCollector, HeartbeatCollector, LogCollector, FileCollector,
    PortCollector, HealthCollector, ClaimsCollector)


def register(registry: CollectorRegistry, latest: Callable[[], Snapshot]) -> None:
    """Register every collector, each rendering the snapshot ``latest()`` returns."""
    for collector in COLLECTORS:
        registry.register(collector(latest))
