"""Webhook throughput of caretaker's receiver against a bare aiohttp handler, one run.

    .venv/bin/python bench/webhook.py [--seconds 5]

Load comes from ``wrk`` (Debian package) on loopback, one thread, with a Lua script
that gives every alert of every request a new fingerprint, so each notification is new
work for the dedupe store (SQLite, durable), not a cached duplicate. For payloads of 1
and 20 alerts at 1 and 32 connections it prints notifications/s and p50/p99 latency of
the receiver (auth, size and type checks, JSON parse, pydantic validation, dedupe and
decision recorded in SQLite, answer) and of a bare aiohttp handler that reads the body
and answers 200. The alerts name a service that allows no repair, so nothing is run:
this measures admission. Bounded: ``--seconds`` per cell (at most 60).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import yaml

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def load(url: str, alerts: int, connections: int, seconds: int, script: Path) -> tuple[float, float, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, env={**os.environ, "BENCH_ALERTS": str(alerts)},
                         timeout=seconds + 60, check=True)
    return parse_wrk(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    if not 1 <= args.seconds <= 60:
        raise SystemExit("--seconds: 1 to 60")
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk: sudo apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="caretaker-bench-"))
    (tmp / "token").write_text(TOKEN)
    (tmp / "bench.lua").write_text(LUA)
    receiver_port, bare_port = free_port(), free_port()
    (tmp / "caretaker.yml").write_text(yaml.safe_dump({
        "receiver": {"port": receiver_port, "bearer_token": {"file": "token"}, "state_file": "state.sqlite"},
        "services": {"svc": {"match": {"comm": "^no-such-process$"}}}}))
    procs = [
        subprocess.Popen([sys.executable, "-m", "receiver.app", "--config", str(tmp / "caretaker.yml"),
                          "--log-level", "WARNING"], cwd=REPO, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(BARE), str(bare_port)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{receiver_port}/-/healthy")
        time.sleep(0.5)
        for alerts in (1, 20):
            for connections in (1, 32):
                bare = load(f"http://127.0.0.1:{bare_port}", alerts, connections, args.seconds, tmp / "bench.lua")
                ours = load(f"http://127.0.0.1:{receiver_port}", alerts, connections, args.seconds,
                            tmp / "bench.lua")
                rows.append((alerts, connections, ours, bare))
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.seconds}s per cell, wrk -t1 on loopback, {os.cpu_count()} CPUs; every alert is new to the store")
    print(f"{'alerts':>6} | {'conns':>5} | {'receiver/s':>10} | {'p50 ms':>7} | {'p99 ms':>7} | "
          f"{'bare/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'ratio':>5}")
    print("-" * 88)
    for alerts, connections, (rps, p50, p99), (brps, bp50, bp99) in rows:
        print(f"{alerts:>6} | {connections:>5} | {rps:>10.0f} | {p50:>7.2f} | {p99:>7.2f} | "
              f"{brps:>8.0f} | {bp50:>7.2f} | {bp99:>7.2f} | {rps / brps:>5.2f}")


if __name__ == "__main__":
    main()
