"""The incidents demo (``make demo``): break the local stack's services, watch caretaker heal them.

1. Redis is killed with SIGKILL (it dies).
2. The web app is frozen with SIGSTOP (alive but not answering; Ctrl+C would do nothing).

For each, a timeline: broken at, alert received at, repair started and finished,
healthy again at, and the heal time. Times come from the receiver's audit trail
(``GET /api/v1/remediations``) and from checking the service the way the exporter
does (processes within [min, max], every probe passing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from exporter.config import Config, load_config, read_secret
from exporter.probes import ProbeContext, run_probes
from exporter.procfs import ProcReader, scan_services
from receiver.process import send_signal

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Incident:
    service: str
    sig: signal.Signals
    what: str


INCIDENTS = (Incident("redis", signal.SIGKILL, "killed with SIGKILL"),
             Incident("webapp", signal.SIGSTOP, "frozen with SIGSTOP"))


def audit(config: Config, service: str) -> list[dict[str, Any]]:
    recv = config.receiver
    req = urllib.request.Request(f"http://127.0.0.1:{recv.port}/api/v1/remediations?service_name={service}&limit=50")
    if recv.bearer_token is not None:
        req.add_header("Authorization", f"Bearer {read_secret(recv.bearer_token, config.base_dir)}")
    with urllib.request.urlopen(req, timeout=2) as resp:
        data: list[dict[str, Any]] = json.load(resp)["data"]
    return data


async def healthy(config: Config, service: str, session: aiohttp.ClientSession) -> bool:
    cfg = config.services[service]
    procs = (await asyncio.to_thread(scan_services, ProcReader(), {service: cfg}, (os.getpid(),), False))[service]
    if not cfg.processes.min <= len(procs) <= cfg.processes.max:
        return False
    results = await run_probes(cfg.probes, ProbeContext(session, config.base_dir))
    return all(r.success for r in results.values())


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


async def run_one(config: Config, incident: Incident, session: aiohttp.ClientSession,
                  timeout: float = 120.0) -> float | None:
    """Break the service, follow the repair; the heal time in seconds, or None."""
    name = incident.service
    reader = ProcReader()
    procs = scan_services(reader, {name: config.services[name]}, (os.getpid(),), False)[name]
    if not procs or not await healthy(config, name, session):
        print(f"{name} is not healthy to begin with; is the stack (`make run`) up?", file=sys.stderr)
        return None
    broken_at = time.time()
    send_signal(reader, procs, incident.sig)
    print(f"\nincident: {name} {incident.what} (pids {', '.join(str(p.pid) for p in procs)})")
    entry: dict[str, Any] | None = None
    healthy_at = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acted = [e for e in audit(config, name) if e["received_at"] >= broken_at and e["decision"] == "acted"]
        if acted:
            entry = min(acted, key=lambda e: e["id"])
            if await healthy(config, name, session):
                healthy_at = time.time()
                break
            if entry["result"] == "failure":
                break
        await asyncio.sleep(0.1)
    rows = [("broken", broken_at, f"{name} {incident.what}")]
    if entry is not None:
        rows.append(("alert received", entry["received_at"], f"{entry['alertname']} (audit #{entry['id']})"))
        if entry["started_at"]:
            rows.append(("repair started", entry["started_at"], entry["action"]))
        while entry["finished_at"] is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            entry = next(e for e in audit(config, name) if e["id"] == entry["id"])
        if entry["finished_at"]:
            rows.append(("repair finished", entry["finished_at"], str(entry["result"])))
        for step in entry["steps"]:
            print(f"    step +{step['at'] - broken_at:7.2f}s  {step['message']}")
    if healthy_at is not None:
        rows.append(("healthy again", healthy_at, "processes in range, probes passing"))
    for label, at, detail in sorted(rows, key=lambda r: r[1]):
        print(f"  {clock(at)}  +{at - broken_at:7.2f}s  {label:<16} {detail}")
    if healthy_at is None:
        print(f"  NOT HEALED within {timeout:g}s")
        return None
    heal = healthy_at - broken_at
    print(f"  heal time: {heal:.2f}s")
    return heal


async def _run(config: Config) -> int:
    results = {}
    async with aiohttp.ClientSession() as session:
        for incident in INCIDENTS:
            if incident.service not in config.services:
                continue
            results[incident.service] = await run_one(config, incident, session)
            await asyncio.sleep(2)
    print("\nsummary:")
    for name, heal in results.items():
        print(f"  {name:<10} {f'healed in {heal:.2f}s' if heal is not None else 'NOT healed'}")
    return 0 if results and all(h is not None for h in results.values()) else 1


def run_incidents(config: Config) -> int:
    return asyncio.run(_run(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "caretaker.yml"))
    args = parser.parse_args()
    raise SystemExit(run_incidents(load_config(args.config)))


if __name__ == "__main__":
    main()
