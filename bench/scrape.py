"""Scrape cost of caretaker's exporter against prometheus-process-exporter, one run.

    .venv/bin/python bench/scrape.py [--counts 0 500 2000] [--scrapes 100]

For each count N it starts N extra idle processes (``sleep``), then both exporters,
each watching the same three services (a Redis, the demo web app, a Python worker)
by the same rules, and scrapes each in turn. Per exporter it prints /metrics latency
p50/p99, CPU seconds per scrape (the exporter process's utime+stime over the run,
divided by the scrapes) and RSS, with the ratio caretaker/process-exporter.

Fairness: caretaker runs without probes (process accounting only, as process-exporter
does); both get a few warm-up scrapes; the idle processes are older than caretaker's
"young process" window when measuring, as most processes on a machine are. Every
process the benchmark starts is in its own process group and is stopped by group.

A third row, ``caretaker example``, is the exporter running the repository's example
config (``caretaker.yml``, pointed at the benchmark's Redis and web app: a tcp and an
http probe, both services' logs followed with the default pattern pack, the web app
writing its access log there): what ``make run`` runs. Its RSS is the figure that
counts for "what does caretaker cost to run"; the ratio row compares the first row.
Bounded: at most ``--scrapes`` per exporter and count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                resp.read()
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class Group:
    """Processes started here, each its own group, stopped by group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p: subprocess.Popen[bytes] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                                      **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.procs.clear()


SPAWNER = """
import os, signal, sys, time
n = int(sys.argv[1])
kids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.execv('/bin/sleep', ['sleep', '3600'])
    kids.append(pid)
def stop(*_):
    for k in kids:
        os.kill(k, signal.SIGKILL)
    for k in kids:
        os.waitpid(k, 0)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
print('ready', flush=True)
while True:
    time.sleep(3600)
"""


def measure(url: str, pid: int, scrapes: int) -> dict[str, float]:
    for _ in range(5):  # warm-up
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback
            resp.read()
    cpu0 = cpu_seconds(pid)
    latencies = []
    for _ in range(scrapes):
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback
            resp.read()
        latencies.append(time.perf_counter() - t)
    cpu = (cpu_seconds(pid) - cpu0) / scrapes
    latencies.sort()
    return {"p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "cpu": cpu, "rss": rss_bytes(pid)}


def example_config(tmp: Path, exporter_port: int, redis_port: int, web_port: int) -> Path:
    """The repository's caretaker.yml with the benchmark's ports; its relative paths
    (``.run/...``) resolve under ``tmp``, where the config is written."""
    text = (REPO / "caretaker.yml").read_text()
    for old, new in (("16379", redis_port), ("8940", web_port), ("port: 8930", f"port: {exporter_port}"),
                     ("port: 8931", f"port: {free_port()}")):
        if old not in text:
            raise SystemExit(f"caretaker.yml changed: no {old!r} to point at the benchmark's services")
        text = text.replace(old, str(new))
    path = tmp / "example.yml"
    path.write_text(text)
    return path


Row = tuple[int, dict[str, float], dict[str, float], dict[str, float]]


def run(counts: list[int], scrapes: int, young_wait: float) -> list[Row]:
    pe_bin = shutil.which("prometheus-process-exporter") or shutil.which("process-exporter")
    redis_bin = shutil.which("redis-server")
    if not pe_bin or not redis_bin:
        raise SystemExit("needs prometheus-process-exporter and redis-server (Debian packages)")
    tmp = Path(tempfile.mkdtemp(prefix="caretaker-bench-"))
    services = Group()
    redis_port, web_port = free_port(), free_port()
    marker = f"bench-worker-{os.getpid()}"
    logs = tmp / ".run" / "logs"  # where the example config follows the services' logs
    logs.mkdir(parents=True)
    services.start([redis_bin, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--dir", str(tmp),
                    "--logfile", str(logs / "redis.log")])
    with open(logs / "webapp.log", "ab") as web_log:
        services.start([sys.executable, str(REPO / "demo" / "webapp.py"), "--port", str(web_port)], stderr=web_log)
    services.start([sys.executable, "-c", "import time\nwhile True: time.sleep(1)", marker])
    rules = {
        "redis": {"comm": "^redis-server$", "cmdline": f":{redis_port}\\b"},
        "webapp": {"cmdline": f"webapp\\.py --port {web_port}$"},
        "worker": {"cmdline": f"{marker}$"},
    }
    rows = []
    try:
        for n in counts:
            idle = Group()
            exporters = Group()
            try:
                if n:
                    spawner = idle.start([sys.executable, "-c", SPAWNER, str(n)], stdout=subprocess.PIPE)
                    assert spawner.stdout is not None
                    spawner.stdout.readline()
                time.sleep(young_wait)  # idle processes older than caretaker's young window
                ct_port, pe_port, ex_port = free_port(), free_port(), free_port()
                config = {"exporter": {"port": ct_port}, "receiver": {"state_file": str(tmp / "state.sqlite")},
                          "services": {name: {"match": m, "processes": {"min": 1, "max": 1}}
                                       for name, m in rules.items()}}
                (tmp / "caretaker.yml").write_text(yaml.safe_dump(config))
                pe_config = {"process_names": [
                    {"name": name, **({"comm": ["redis-server"]} if "comm" in m else {}), "cmdline": [m["cmdline"]]}
                    for name, m in rules.items()]}
                (tmp / "process-exporter.yml").write_text(yaml.safe_dump(pe_config))
                ct = exporters.start([sys.executable, "-m", "exporter.app", "--config", str(tmp / "caretaker.yml"),
                                      "--log-level", "WARNING"], cwd=REPO)
                example = example_config(tmp, ex_port, redis_port, web_port)
                ex = exporters.start([sys.executable, "-m", "exporter.app", "--config", str(example),
                                      "--log-level", "WARNING"], cwd=REPO)
                pe = exporters.start([pe_bin, "-config.path", str(tmp / "process-exporter.yml"),
                                      "-web.listen-address", f"127.0.0.1:{pe_port}"])
                ct_url, pe_url = f"http://127.0.0.1:{ct_port}/metrics", f"http://127.0.0.1:{pe_port}/metrics"
                ex_url = f"http://127.0.0.1:{ex_port}/metrics"
                for url in (ct_url, pe_url, ex_url):
                    wait_http(url)
                procs = len([d for d in os.listdir("/proc") if d.isdigit()])
                rows.append((procs, measure(ct_url, ct.pid, scrapes), measure(pe_url, pe.pid, scrapes),
                             measure(ex_url, ex.pid, scrapes)))
            finally:
                exporters.stop()
                idle.stop()
    finally:
        services.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 500, 2000])
    parser.add_argument("--scrapes", type=int, default=100)
    parser.add_argument("--young-wait", type=float, default=11.0,
                        help="seconds to let the idle processes age before measuring (default: %(default)s)")
    args = parser.parse_args()
    if args.scrapes > 10_000 or max(args.counts) > 10_000:
        raise SystemExit("bounded: at most 10000 scrapes and 10000 processes")
    rows = run(args.counts, args.scrapes, args.young_wait)
    print(f"{args.scrapes} scrapes each, {os.cpu_count()} CPUs; ms = milliseconds per /metrics; "
          "ratio = caretaker / process-exporter")
    print(f"{'processes':>9} | {'exporter':<17} | {'p50 ms':>7} | {'p99 ms':>7} | "
          f"{'CPU ms/scrape':>13} | {'RSS MiB':>7}")
    print("-" * 76)
    def line(procs: str, name: str, m: dict[str, float]) -> None:
        print(f"{procs:>9} | {name:<17} | {m['p50'] * 1e3:7.2f} | {m['p99'] * 1e3:7.2f} | "
              f"{m['cpu'] * 1e3:13.2f} | {m['rss'] / 2**20:7.1f}")

    for procs, ct, pe, ex in rows:
        line(str(procs), "caretaker", ct)
        line("", "process-exporter", pe)
        print(f"{'':>9} | {'ratio':<17} | {ct['p50'] / pe['p50']:7.2f} | {ct['p99'] / pe['p99']:7.2f} | "
              f"{ct['cpu'] / pe['cpu'] if pe['cpu'] else float('nan'):13.2f} | {ct['rss'] / pe['rss']:7.2f}")
        line("", "caretaker example", ex)


if __name__ == "__main__":
    main()
