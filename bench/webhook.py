"""Webhook throughput of caretaker's receiver against a bare aiohttp handler, one run.

    .venv/bin/python bench/webhook.py [--seconds 5] [--rounds 3]

Load comes from ``wrk`` (Debian package) on loopback, one thread, with a Lua script
that gives every alert of every request a new fingerprint, so each notification is new
work for the dedupe store (SQLite, durable), not a cached duplicate. For payloads of 1
and 20 alerts at 1 and 32 connections it prints notifications/s, p50/p99 latency and
CPU time per notification of the receiver (auth, size and type checks, JSON parse,
pydantic validation, dedupe and decision committed to SQLite, answer) and of a bare
aiohttp handler that reads the body and answers 200. The alerts name a service that
allows no repair, so nothing is run: this measures admission.

Fairness on a small, shared machine: each server is pinned to CPU 0 and wrk to CPU 1
(with two CPUs or more), the two servers take turns in ``--rounds`` rounds per cell
(order alternating), and the table gives the median of the rounds; the ratio is
the median of each round's receiver/bare ratio (paired runs minutes apart drift
less than a whole run does). CPU time per
notification (all threads of the server, from /proc/PID/stat) moves less than
throughput when the machine is noisy. Bounded: ``--seconds`` (at most 60) per run.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from scrape import free_port

REPO = Path(__file__).resolve().parent.parent
TOKEN = secrets.token_hex(16)

BARE = """
from aiohttp import web
async def handle(request):
    await request.read()
    return web.json_response({"status": "success"})
app = web.Application()
app.router.add_post("/alerts", handle)
web.run_app(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), print=None, access_log=None)
"""

LUA = """
local n = tonumber(os.getenv("BENCH_ALERTS"))
local counter = 0
local prefix = string.format("%x", math.random(1, 2^30))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer TOKEN"
request = function()
  local alerts = {}
  for i = 1, n do
    counter = counter + 1
    alerts[i] = string.format(
      '{"status":"firing","labels":{"alertname":"CaretakerServiceDown","service_name":"svc",' ..
      '"remediation":"restart","instance":"127.0.0.1:8930","job":"caretaker-exporter","severity":"critical"},' ..
      '"annotations":{"summary":"svc is down","description":"a longer description of the alert"},' ..
      '"startsAt":"2026-11-22T03:00:00.123Z","endsAt":"0001-01-01T00:00:00Z",' ..
      '"generatorURL":"http://127.0.0.1:9090/graph","fingerprint":"%s%08x"}', prefix, counter)
  end
  local body = '{"version":"4","status":"firing","receiver":"caretaker","groupKey":"{}:{alertname=\\\\"X\\\\"}",' ..
    '"truncatedAlerts":0,"groupLabels":{},"commonLabels":{},"commonAnnotations":{},' ..
    '"externalURL":"http://127.0.0.1:9093","alerts":[' .. table.concat(alerts, ",") .. ']}'
  return wrk.format(nil, "/alerts", nil, body)
end
""".replace("TOKEN", TOKEN)


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def parse_wrk(output: str) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from ``wrk --latency`` output."""
    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    if re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        raise RuntimeError(f"non-2xx answers during the run:\n{output}")
    return rps, p50, p99


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of ``pid``, in clock ticks (proc(5))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if (os.cpu_count() or 1) >= 2 and shutil.which("taskset") else []


@dataclass
class Run:
    rps: float
    p50: float
    p99: float
    cpu_us: float
    """CPU time of the server per request, microseconds."""


def load(url: str, server_pid: int, alerts: int, connections: int, seconds: int, script: Path) -> Run:
    before = cpu_ticks(server_pid)
    out = subprocess.run([*pinned(1), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
                          str(script), url],
                         capture_output=True, text=True, env={**os.environ, "BENCH_ALERTS": str(alerts)},
                         timeout=seconds + 60, check=True)
    ticks = cpu_ticks(server_pid) - before
    rps, p50, p99 = parse_wrk(out.stdout)
    requests = int(re.search(r"(\d+) requests in", out.stdout).group(1))  # type: ignore[union-attr]
    return Run(rps, p50, p99, ticks / os.sysconf("SC_CLK_TCK") / max(requests, 1) * 1e6)


def median_run(runs: list[Run]) -> Run:
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in ("rps", "p50", "p99", "cpu_us")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 1 <= args.seconds <= 60:
        raise SystemExit("--seconds: 1 to 60")
    if not 1 <= args.rounds <= 9:
        raise SystemExit("--rounds: 1 to 9")
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk: sudo apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="caretaker-bench-"))
    (tmp / "token").write_text(TOKEN)
    (tmp / "bench.lua").write_text(LUA)
    receiver_port, bare_port = free_port(), free_port()
    (tmp / "caretaker.yml").write_text(yaml.safe_dump({
        "receiver": {"port": receiver_port, "bearer_token": {"file": "token"}, "state_file": "state.sqlite"},
        # Every alert asks for a repair the service allows, so each opens a problem and the
        # service's worker looks at it (--dry-run: it decides and records, starts nothing).
        "services": {"svc": {"match": {"comm": "^no-such-process$"}, "start": {"argv": ["/bin/true"]},
                             "remediation": {"allow": ["restart"]}}}}))
    receiver = subprocess.Popen([*pinned(0), sys.executable, "-m", "receiver.app", "--config",
                                 str(tmp / "caretaker.yml"), "--log-level", "WARNING", "--dry-run"], cwd=REPO,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = subprocess.Popen([*pinned(0), sys.executable, "-c", textwrap.dedent(BARE), str(bare_port)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{receiver_port}/-/healthy")
        time.sleep(0.5)
        for alerts in (1, 20):
            for connections in (1, 32):
                ours: list[Run] = []
                theirs: list[Run] = []
                for round_ in range(args.rounds):
                    turns = [(bare, bare_port, theirs), (receiver, receiver_port, ours)]
                    for proc, port, runs in turns if round_ % 2 == 0 else reversed(turns):
                        runs.append(load(f"http://127.0.0.1:{port}", proc.pid, alerts, connections, args.seconds,
                                         tmp / "bench.lua"))
                ratio = statistics.median(o.rps / t.rps for o, t in zip(ours, theirs, strict=True))
                rows.append((alerts, connections, median_run(ours), median_run(theirs), ratio))
    finally:
        for p in (receiver, bare):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    placement = "servers on CPU 0, wrk on CPU 1" if pinned(0) else "not pinned"
    print(f"median of {args.rounds} rounds of {args.seconds}s per cell, wrk -t1 on loopback, {os.cpu_count()} CPUs "
          f"({placement}); every alert is new to the store")
    print(f"{'alerts':>6} | {'conns':>5} | {'receiver/s':>10} | {'p50 ms':>6} | {'p99 ms':>6} | {'CPU us':>6} | "
          f"{'bare/s':>7} | {'p50 ms':>6} | {'p99 ms':>6} | {'CPU us':>6} | {'ratio':>5}")
    print("-" * 98)
    for alerts, connections, r, b, ratio in rows:
        print(f"{alerts:>6} | {connections:>5} | {r.rps:>10.0f} | {r.p50:>6.2f} | {r.p99:>6.2f} | {r.cpu_us:>6.0f} | "
              f"{b.rps:>7.0f} | {b.p50:>6.2f} | {b.p99:>6.2f} | {b.cpu_us:>6.0f} | {ratio:>5.2f}")
    print("ratio: median over rounds of receiver/s over the bare handler's /s in the same round; "
          "CPU us: the server's CPU time per notification")


if __name__ == "__main__":
    main()
