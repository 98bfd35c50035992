"""Collection (async: /proc scan in a thread, probes concurrently) and exposition.

:class:`Scraper` gathers a :class:`Snapshot` within a deadline; :class:`ServiceCollector`
is a prometheus-client custom collector that renders the latest snapshot. It yields
fresh metric families on every ``collect()`` and does no I/O, so registering it is
safe. Lines it emits, per configured service (``service_name`` label), e.g.::

    caretaker_service_processes{service_name="redis"} 1.0
    caretaker_service_min_processes{service_name="redis"} 1.0
    caretaker_service_max_processes{service_name="redis"} 1.0
    caretaker_service_processes_by_status{service_name="redis",status="stopped"} 0.0
    caretaker_service_resident_memory_bytes{service_name="redis"} 4.194304e+06
    caretaker_service_cpu_seconds_total{service_name="redis"} 0.52
    caretaker_service_open_fds{service_name="redis"} 9.0
    caretaker_service_oldest_start_time_seconds{service_name="redis"} 1.7637e+09
    caretaker_probe_success{probe="ping",service_name="redis",type="tcp"} 1.0
    caretaker_probe_duration_seconds{probe="ping",service_name="redis",type="tcp"} 0.0004
    caretaker_service_health_ratio{service_name="redis"} 1.0
    caretaker_service_health_component_ratio{component="processes",service_name="redis"} 1.0

Every series exists from the first scrape, with 0 where nothing was found.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import health
from .config import Config
from .probes import ProbeResult, run_probes
from .procfs import CpuAccountant, ProcessInfo, ProcessTable, ProcReader

__all__ = ["STATUSES", "Scraper", "ServiceCollector", "ServiceState", "Snapshot"]

log = logging.getLogger(__name__)

STATUSES = {"R": "running", "S": "sleeping", "D": "disk-sleep", "T": "stopped", "t": "tracing-stop",
            "I": "idle", "W": "waking", "P": "parked"}
"""proc(5) state letters named as psutil names them (``psutil.STATUS_*``)."""


@dataclass(frozen=True)
class ServiceState:
    processes: tuple[ProcessInfo, ...] = ()
    cpu_seconds_total: float = 0.0
    probes: dict[str, ProbeResult] = field(default_factory=dict)
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
                 session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self.reader = reader or ProcReader()
        self.session = session
        self.cpu = CpuAccountant()
        self.table = ProcessTable(self.reader, config.services, (os.getpid(),))
        self.snapshot: Snapshot | None = None
        self._running: asyncio.Task[Snapshot] | None = None
        self._scan: asyncio.Future[dict[str, list[ProcessInfo]]] | None = None
        self.errors = Counter("caretaker_exporter_errors", "Collection problems, by reason.",
                              ["reason"], registry=registry)
        for reason in ("scan_timeout", "scan_error"):
            self.errors.labels(reason)
        self.scrape_duration = Gauge("caretaker_exporter_scrape_duration_seconds",
                                     "Duration of the last collection (process scan and probes).",
                                     registry=registry)

    async def collect(self, deadline_seconds: float) -> Snapshot:
        """A fresh snapshot, gathered within ``deadline_seconds`` (a timed-out scan
        leaves the previous process view in place and is counted as an error)."""
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._collect(deadline_seconds))
        return await asyncio.shield(self._running)

    async def _scan_processes(self, deadline: float) -> dict[str, list[ProcessInfo]] | None:
        loop = asyncio.get_running_loop()
        if self._scan is None or self._scan.done():
            self._scan = loop.run_in_executor(None, self.table.scan)
        try:
            return await asyncio.wait_for(asyncio.shield(self._scan), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.errors.labels("scan_timeout").inc()
            log.warning("process scan did not finish within the scrape deadline")
        except OSError as err:
            self.errors.labels("scan_error").inc()
            log.error("process scan failed: %s", err)
        return None

    async def _collect(self, deadline_seconds: float) -> Snapshot:
        started = time.monotonic()
        deadline = started + deadline_seconds
        session = self.session
        assert session is not None, "Scraper.session must be set before collecting"
        scan_task = asyncio.create_task(self._scan_processes(deadline))
        probe_tasks = {name: asyncio.create_task(run_probes(cfg.probes, session, deadline_seconds))
                       for name, cfg in self.config.services.items()}
        scanned = await scan_task
        previous = self.snapshot.services if self.snapshot else {}
        services: dict[str, ServiceState] = {}
        for name, cfg in self.config.services.items():
            probes = await probe_tasks[name]
            if scanned is not None:
                procs = tuple(scanned[name])
                cpu_total = self.cpu.update(name, procs)
            else:
                procs = previous[name].processes if name in previous else ()
                cpu_total = self.cpu.total(name)
            parts = health.components(cfg, procs, probes)
            services[name] = ServiceState(procs, cpu_total, probes, parts,
                                          health.score(parts, self.config.weights_for(name)))
        duration = time.monotonic() - started
        self.scrape_duration.set(duration)
        self.snapshot = Snapshot(services, duration, time.time())
        return self.snapshot


class ServiceCollector(Collector):
    """Renders :attr:`Scraper.snapshot`; before any collection, every series is 0."""

    def __init__(self, scraper: Scraper) -> None:
        self.scraper = scraper

    def collect(self) -> Iterator[Metric]:
        config = self.scraper.config
        snap = self.scraper.snapshot
        states = snap.services if snap else {}
        svc = ["service_name"]
        processes = GaugeMetricFamily("caretaker_service_processes", "Processes of the service now running.",
                                      labels=svc)
        min_p = GaugeMetricFamily("caretaker_service_min_processes", "Fewest processes expected (config).", labels=svc)
        max_p = GaugeMetricFamily("caretaker_service_max_processes", "Most processes expected (config).", labels=svc)
        by_status = GaugeMetricFamily("caretaker_service_processes_by_status",
                                      "Processes of the service by scheduler status (psutil names).",
                                      labels=["service_name", "status"])
        rss = GaugeMetricFamily("caretaker_service_resident_memory_bytes",
                                "Resident set size summed over the service's processes.", labels=svc)
        cpu = CounterMetricFamily("caretaker_service_cpu_seconds",
                                  "User and system CPU time used by the service's processes.", labels=svc)
        fds = GaugeMetricFamily("caretaker_service_open_fds",
                                "Open file descriptors summed over the service's processes.", labels=svc)
        oldest = GaugeMetricFamily("caretaker_service_oldest_start_time_seconds",
                                   "Start time of the service's oldest process, Unix seconds; 0 when none.",
                                   labels=svc)
        probe_labels = ["service_name", "probe", "type"]
        p_success = GaugeMetricFamily("caretaker_probe_success", "1 when the probe passed in the last collection.",
                                      labels=probe_labels)
        p_duration = GaugeMetricFamily("caretaker_probe_duration_seconds", "How long the probe took.",
                                       labels=probe_labels)
        h_ratio = GaugeMetricFamily("caretaker_service_health_ratio",
                                    "Composite health of the service, 0 (broken) to 1 (healthy).", labels=svc)
        h_parts = GaugeMetricFamily("caretaker_service_health_component_ratio",
                                    "Parts of the health score, 0 to 1.", labels=["service_name", "component"])
        for name, cfg in config.services.items():
            state = states.get(name) or ServiceState(
                components=health.components(cfg, (), {}))
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
            cpu.add_metric([name], state.cpu_seconds_total)
            fds.add_metric([name], sum(p.open_fds or 0 for p in procs))
            oldest.add_metric([name], min((p.start_time_seconds for p in procs), default=0.0))
            for probe in cfg.probes:
                result = state.probes.get(probe.name)
                p_success.add_metric([name, probe.name, probe.type], 1.0 if result and result.success else 0.0)
                p_duration.add_metric([name, probe.name, probe.type], result.duration_seconds if result else 0.0)
            h_ratio.add_metric([name], state.health)
            for component, value in state.components.items():
                h_parts.add_metric([name, component], value if snap else 0.0)
        yield from (processes, min_p, max_p, by_status, rss, cpu, fds, oldest, p_success, p_duration,
                    h_ratio, h_parts)
