"""Cost of scanning work claims: the exporter's scan of N claims against the scrape timeout.

    .venv/bin/python bench/claims.py [--counts 1000 10000] [--orphaned 0.1 1.0] [--scans 20]

For each row it fills a fresh Redis with N claims in the issue's layout (the
``claims:`` defaults), each with its own owner id, a given share of them orphaned
(their heartbeat key absent and their pid not running: an ``EXISTS`` each, and no look
in ``/proc`` since the scan lists the running pids once), the others active: owned by
one of 20 live processes on this host
(one look in ``/proc`` per process, no ``EXISTS``), or, in the ``remote`` rows, by
owners on another host, whose heartbeat key is there (an ``EXISTS`` each). Then it
times:

- ``scan``: :func:`exporter.claims.scan_claims` in this process, as the exporter's
  thread runs it (``SSCAN`` batches, pipelined ``HMGET`` and ``EXISTS``, ``/proc``);
- ``scrape``: ``GET /metrics`` of a real ``caretaker-exporter`` watching those claims
  (and nothing else), with Prometheus's timeout header set to the shipped
  ``scrape_timeout``, checking that every scrape shows the right counts and that no
  scan missed its deadline (``caretaker_claims_scan_errors_total{reason="timeout"}``).

and prints p50/p99/max of each, with the shipped scrape timeout
(``prometheus/prometheus.yml``: 1 s) beside them. Every process it starts runs in its
own process group and is stopped by group; counts are bounded (at most 100,000).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from scrape import Group, cpu_seconds, free_port, wait_http

from exporter.claims import Liveness, connect, scan_claims
from exporter.config import parse_config

REPO = Path(__file__).resolve().parent.parent
SCRAPE_TIMEOUT = float(yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())["global"]
                       ["scrape_timeout"].rstrip("s"))
PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())


def _dead_pids() -> Sequence[int]:
    """Pids above this machine's pid_max, below Linux's largest (2^22): valid pids that no
    process has, as a dead owner's (many distinct ones, as many dead workers leave). Where pid_max is already
    the largest: the pid of a process that has just exited, for every claim."""
    above = range(PID_MAX + 1, min(PID_MAX + 100_001, 1 << 22))
    if above:
        return above
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    return [proc.pid]


DEAD_PIDS = _dead_pids()
WORKERS = 20
"""Live processes that own the active claims (``sleep``)."""


def fill(r: redis.Redis, n: int, orphaned_share: float, owners: list[int], remote: bool) -> int:
    """N claims, each with its own owner; returns how many are orphaned. An active
    claim's owner is one of ``owners`` (live processes) and its heartbeat is there; an
    orphaned one's pid runs nothing and its heartbeat is gone. ``remote``: every owner
    on another host, judged by its heartbeat alone (one EXISTS per claim)."""
    r.flushdb()
    now = time.time()
    orphans = 0
    with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            owner = f"worker-{i}"
            orphan = i < n * orphaned_share
            orphans += orphan
            pid = DEAD_PIDS[i % len(DEAD_PIDS)] if orphan else owners[i % len(owners)]
            pipe.sadd("processing_issues", str(i))
            pipe.hset(f"issue:{i}", mapping={
                "status": "processing", "processId": owner, "pid": str(pid), "host": "elsewhere" if remote else "",
                "taskType": "summarize", "startTime": time.strftime(
                    "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - (60 + i % 3600 if orphan else 0)))})
            if not orphan:
                pipe.set(f"heartbeat:{owner}", "1", ex=3600)
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
    return orphans


def quantiles(values: list[float]) -> tuple[float, float, float]:
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.99))], values[-1]


def gauge(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(name)


def measure(port: int, n: int, share: float, remote: bool, owners: list[int], scans: int,
            tmp: Path) -> dict[str, Any]:
    r = redis.Redis(port=port)
    orphans = fill(r, n, share, owners, remote)
    exporter_port = free_port()
    config = {"exporter": {"port": exporter_port, "state_file": str(tmp / "exporter-state.json")},
              "services": {"worker": {"match": {"comm": "^nothing-matches$"}, "processes": {"min": 0},
                                      "claims": {"port": port, "timeout": "10s"}}}}
    spec = parse_config(config, base_dir=tmp).services["worker"].claims
    assert spec is not None
    client = connect(spec, tmp)
    scan_times = []
    for _ in range(scans):
        started = time.perf_counter()
        seen = scan_claims(client, spec, Liveness(), time.monotonic() + 60)
        scan_times.append(time.perf_counter() - started)
        assert (seen.orphaned, seen.active) == (orphans, n - orphans), seen.summary()
    client.close()
    (tmp / "caretaker.yml").write_text(yaml.safe_dump(config))
    exporter = Group()
    try:
        proc = exporter.start([sys.executable, "-m", "exporter.app", "--config", str(tmp / "caretaker.yml"),
                               "--log-level", "WARNING"], cwd=REPO)
        url = f"http://127.0.0.1:{exporter_port}/metrics"
        wait_http(url)
        request = urllib.request.Request(url, headers={"X-Prometheus-Scrape-Timeout-Seconds": str(SCRAPE_TIMEOUT)})
        scrape_times = []
        cpu0 = cpu_seconds(proc.pid)
        for i in range(scans + 1):
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
                text = resp.read().decode()
            if i:  # the first one connects
                scrape_times.append(time.perf_counter() - started)
            assert gauge(text, "caretaker_claims", state="orphaned") == orphans
        cpu = (cpu_seconds(proc.pid) - cpu0) / (scans + 1)
        missed = gauge(text, "caretaker_claims_scan_errors_total", reason="timeout")
    finally:
        exporter.stop()
    return {"n": n, "orphans": orphans, "owners": "remote" if remote else "local", "scan": quantiles(scan_times),
            "scrape": quantiles(scrape_times), "cpu": cpu, "missed": missed}


def ping(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.ConnectionError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--orphaned", type=float, nargs="+", default=[0.1, 1.0],
                        help="shares of orphaned claims, each a row per count (default: %(default)s)")
    parser.add_argument("--scans", type=int, default=20)
    args = parser.parse_args()
    if max(args.counts) > 100_000 or args.scans > 1000:
        raise SystemExit("bounded: at most 100000 claims and 1000 scans")
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("needs redis-server (Debian package redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="caretaker-bench-claims-"))
    group = Group()
    rows = []
    try:
        port = free_port()
        group.start([redis_bin, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                     "--dir", str(tmp)])
        deadline = time.monotonic() + 10
        while not ping(port):
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.1)
        workers = [group.start(["sleep", "3600"]) for _ in range(WORKERS)]
        time.sleep(1.5)  # the claims are made after the workers started (PIDFILE_SLACK_SECONDS)
        owners = [w.pid for w in workers]
        for n in args.counts:
            for share in args.orphaned:
                rows.append(measure(port, n, share, False, owners, args.scans, tmp))
            rows.append(measure(port, n, args.orphaned[0], True, owners, args.scans, tmp))
    finally:
        group.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.scans} scans and scrapes per row, {os.cpu_count()} CPUs; scrape timeout {SCRAPE_TIMEOUT:g}s "
          "(prometheus/prometheus.yml); ms = milliseconds")
    print(f"{'claims':>7} | {'owners':>6} | {'orphaned':>8} | {'scan p50':>8} | {'p99':>7} | {'max':>7} | "
          f"{'scrape p50':>10} | {'p99':>7} | {'max':>7} | {'CPU ms/scrape':>13} | {'late scans':>10} | within timeout")
    print("-" * 135)
    for row in rows:
        s50, s99, smax = (t * 1e3 for t in row["scan"])
        c50, c99, cmax = (t * 1e3 for t in row["scrape"])
        within = "yes" if cmax < SCRAPE_TIMEOUT * 1e3 and not row["missed"] else "NO"
        print(f"{row['n']:>7} | {row['owners']:>6} | {row['orphans']:>8} | {s50:8.1f} | {s99:7.1f} | {smax:7.1f} | "
              f"{c50:10.1f} | {c99:7.1f} | {cmax:7.1f} | {row['cpu'] * 1e3:13.1f} | {row['missed']:>10.0f} | {within}")


if __name__ == "__main__":
    main()
