"""Fuzz the receiver: generated hostile requests, and what they did.

    .venv/bin/python bench/fuzz.py [--requests 10000] [--seed 1]

Starts a real receiver (``python -m receiver.app``) on loopback with a service that
allows no repair, so every alert it gets is invalid for acting, then sends
``--requests`` generated requests, 16 at a time: webhook payloads with hostile labels
(unknown services, shell text, paths, huge and non-UTF-8 values), JSON that is not a
payload, JSON nested deeper than allowed, bodies over the limit, wrong content types,
missing, wrong and non-UTF-8 credentials, and malformed HTTP sent on raw sockets.
Prints: answers by status code, 5xx, tracebacks and lines in the receiver's log,
repairs acted on (must be 0), the audit trail's rows against its retention, and the
receiver's RSS before and after. Bounded: at most ``--requests`` (≤ 100,000) and 10
minutes. Exit 1 if a 5xx, a traceback or an action was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from scrape import free_port

REPO = Path(__file__).resolve().parent.parent
TOKEN = "fuzz-token-0123456789"  # noqa: S105 - a throwaway receiver on loopback
HOSTILE = ["svc", "restart", "; rm -rf /", "$(id)", "`id`", "../../etc/passwd", "a\nb", "\x00", "é" * 50,
           "x" * 5000, "{queue}", "*", "", " ", "\\", '"', "restart,restart", "exec"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def alert(rng: random.Random) -> dict[str, Any]:
    labels = {k: rng.choice(HOSTILE) for k in rng.sample(["alertname", "service_name", "remediation", "x", "probe",
                                                          "path"], rng.randint(0, 6))}
    if rng.random() < 0.5:
        labels["service_name"] = rng.choice(["svc", "ghost", "svc "])
        labels["remediation"] = rng.choice(["restart", "exec", "kill", "restart; id"])
    if rng.random() < 0.9:  # well-formed, hostile only in its labels: it reaches the decisions
        return {"status": rng.choice(["firing", "resolved"]), "labels": labels,
                "startsAt": f"2026-11-{rng.randint(10, 22)}T03:00:00Z", "fingerprint": f"{rng.getrandbits(64):x}"}
    return {"status": rng.choice(["firing", "resolved", "weird"]), "labels": labels,
            "startsAt": rng.choice(["2026-11-22T03:00:00Z", "not a time", "2026-11-22T03:00:00"]),
            "fingerprint": rng.choice(["abc123", f"{rng.getrandbits(64):x}", "../x", "x" * 80])}


def request(rng: random.Random, limit: int) -> tuple[str, bytes, dict[str, str]]:
    """(kind, body, headers) of one generated request."""
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    kind = rng.choice(["payload", "payload", "payload", "junk_json", "not_json", "deep", "big", "ctype", "noauth",
                       "badauth"])
    if kind == "payload":
        body = {"version": rng.choice(["4", "4", "3", 4]), "status": "firing",
                "alerts": [alert(rng) for _ in range(rng.randint(0, 5))]}
        return kind, json.dumps(body).encode(), auth
    if kind == "junk_json":
        return kind, json.dumps(rng.choice([[], {}, 1, "x", None, {"alerts": "x"}, {"version": "4"}])).encode(), auth
    if kind == "not_json":
        return kind, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))), auth
    if kind == "deep":
        depth = rng.randint(150, 5000)
        return kind, b"[" * depth + b"]" * depth, auth
    if kind == "big":
        return kind, b'{"version": "4", "pad": "' + b"x" * (limit + 10) + b'"}', auth
    if kind == "ctype":
        return kind, b"{}", {**auth, "Content-Type": rng.choice(["text/plain", "application/xml", ""])}
    if kind == "noauth":
        return kind, b"{}", {"Content-Type": "application/json"}
    return kind, b"{}", {**auth, "Authorization": rng.choice(["Bearer wrong", "Basic Zm9vOmJhcg==", "Bearer", ""])}


RAW = [b"GARBAGE\r\n\r\n", b"POST /alerts HTTP/1.1\r\nHost: x\r\nNo colon\r\n\r\n",
       b"POST /alerts HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"POST /alerts HTTP/9.9\r\n\r\n",
       b"POST /alerts HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
       b"POST /alerts HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\nContent-Length: 2\r\n\r\n{}"]


async def raw(port: int, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 10)
    except (ConnectionError, TimeoutError):
        return 0
    finally:
        writer.close()
    parts = head.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


async def fuzz(port: int, total: int, seed: int, limit: int, deadline: float) -> Counter[str]:
    rng = random.Random(seed)  # noqa: S311 - reproducible inputs, not secrets
    codes: Counter[str] = Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    url = f"http://127.0.0.1:{port}/alerts"
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            while not queue.empty() and time.monotonic() < deadline:
                i = queue.get_nowait()
                if i % 20 == 0:
                    codes[str(await raw(port, rng.choice(RAW)))] += 1
                    continue
                _, body, headers = request(rng, limit)
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        codes[str(resp.status)] += 1
                except aiohttp.ClientError as err:
                    codes[f"client error: {type(err).__name__}"] += 1

        await asyncio.gather(*(worker() for _ in range(16)))
    return codes


def start_receiver(config: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """A receiver process with its output appended to ``log_path``, once it listens."""
    with open(log_path, "ab") as log:
        receiver = subprocess.Popen([sys.executable, "-m", "receiver.app", "--config", str(config)], cwd=REPO,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return receiver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000:
        raise SystemExit("--requests: 1 to 100000")
    tmp = Path(tempfile.mkdtemp(prefix="caretaker-fuzz-"))
    port, limit, max_entries = free_port(), 65536, 1000
    (tmp / "token").write_text(TOKEN)
    (tmp / "caretaker.yml").write_text(yaml.safe_dump({
        "receiver": {"port": port, "bearer_token": {"file": "token"}, "state_file": "state.sqlite",
                     "max_body_bytes": limit, "audit_retention": {"max_entries": max_entries}},
        "services": {"svc": {"match": {"comm": "^caretaker-fuzz-none$"}, "processes": {"min": 0, "max": 1}}}}))
    log_path = tmp / "receiver.log"
    receiver = start_receiver(tmp / "caretaker.yml", port, log_path)
    try:
        rss_before = rss_kib(receiver.pid)
        started = time.monotonic()
        codes = asyncio.run(fuzz(port, args.requests, args.seed, limit, started + 600))
        took = time.monotonic() - started
        rss_after = rss_kib(receiver.pid)
        alive = receiver.poll() is None
    finally:
        receiver.terminate()
        receiver.wait(10)
    db = sqlite3.connect(tmp / "state.sqlite")
    before_prune = db.execute("SELECT COUNT(*) FROM remediations").fetchone()[0]
    db.close()
    again = start_receiver(tmp / "caretaker.yml", port, log_path)  # it prunes at start (a running one every 60 s)
    again.terminate()
    again.wait(10)
    db = sqlite3.connect(tmp / "state.sqlite")
    rows, acted = db.execute("SELECT COUNT(*), SUM(decision = 'acted') FROM remediations").fetchone()
    db.close()
    log_text = log_path.read_text(errors="replace")
    fives = sum(n for code, n in codes.items() if code.startswith("5"))
    tracebacks = log_text.count("Traceback")
    print(f"{sum(codes.values())} requests in {took:.1f}s, seed {args.seed}, 16 at a time, receiver pid alive: {alive}")
    print("answers: " + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items())) + "  (0: connection closed)")
    print(f"5xx: {fives}   tracebacks in the log: {tracebacks}   log lines: {len(log_text.splitlines())}")
    print(f"repairs acted on: {acted or 0}")
    print(f"audit trail: {before_prune} rows for the alerts recorded, {rows} after a prune (retention: "
          f"{max_entries} rows; a running receiver prunes every 60 s)")
    print(f"receiver RSS: {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after")
    if fives or tracebacks or acted or not alive:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
