"""What ``caretaker_client.Heartbeat.beat()`` costs the app's work loop, one run.

    .venv/bin/python bench/beat.py [--calls 1000000] [--rounds 5]

Prints nanoseconds per call (median of ``--rounds``) of: an empty Python function call
(the floor), ``beat()`` with no sender, and ``beat()`` while the sender thread runs
(interval 10 ms) against an exporter that is down (connections refused), so that it
keeps trying. Nothing else runs; at most ``--calls`` calls per round and cell.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from collections.abc import Callable

from caretaker_client import Heartbeat


def per_call_ns(func: Callable[[], None], calls: int) -> float:
    begin = time.perf_counter_ns()
    for _ in range(calls):
        func()
    return (time.perf_counter_ns() - begin) / calls


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    calls, rounds = min(args.calls, 10_000_000), min(args.rounds, 20)

    def nothing() -> None:
        return None

    idle = Heartbeat("bench", f"http://127.0.0.1:{closed_port()}")
    busy = Heartbeat("bench", f"http://127.0.0.1:{closed_port()}", interval=0.01, timeout=0.5).start()
    try:
        cells = {"empty function call": nothing, "beat(), no sender": idle.beat,
                 "beat(), sender running (exporter down)": busy.beat}
        print(f"{'':<40} {'ns/call':>8}   ({calls} calls, median of {rounds} rounds)")
        for name, func in cells.items():
            figures = [per_call_ns(func, calls) for _ in range(rounds)]
            print(f"{name:<40} {statistics.median(figures):>8.1f}")
    finally:
        busy.stop()


if __name__ == "__main__":
    main()
