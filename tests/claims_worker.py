"""A worker for the claims tests, as an app would write one with caretaker_client.

    python tests/claims_worker.py --tag NAME [--ttl SECONDS] [--host NAME] [--lifetime SECONDS]

Redis comes from ``CARETAKER_CLAIMS_REDIS_URL`` (the client's own way). The worker
takes ids from ``task_queue`` (``take``: pop and claim in one step) and works on each:
``INCR started:<id>``, sleeps the item's ``seconds`` field (default 0.2), then
``INCR done:<id>`` and ``RPUSH finished <id>``, all inside the claim, so a worker
killed mid-job has started a job it never finished. ``--host`` writes another host name
in its claims (an owner that caretaker can judge by its heartbeat only). It stops by
itself after ``--lifetime`` seconds. Imports caretaker_client and redis only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import redis

from caretaker_client.claims import take


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", required=True, help="makes this worker's command line unique")
    parser.add_argument("--ttl", type=float, default=2.0, help="heartbeat TTL, seconds")
    parser.add_argument("--host", default=None, help="host name written in the claims")
    parser.add_argument("--lifetime", type=float, default=300.0)
    args = parser.parse_args()
    assert "exporter" not in sys.modules and "receiver" not in sys.modules
    client = redis.Redis.from_url(os.environ["CARETAKER_CLAIMS_REDIS_URL"], socket_timeout=2)
    fields = {"host": args.host} if args.host else None
    print(f"worker {os.getpid()} ready", flush=True)
    stop_at = time.monotonic() + args.lifetime
    while time.monotonic() < stop_at:
        job = take(timeout=0.5, poll=0.05, redis=client, heartbeat_ttl=args.ttl, fields=fields)
        if job is None:
            continue
        with job:
            item = f"issue:{job.item_id}"
            client.incr(f"started:{job.item_id}")
            print(f"start {job.item_id}", flush=True)
            time.sleep(float(client.hget(item, "seconds") or 0.2))
            client.incr(f"done:{job.item_id}")
            client.rpush("finished", job.item_id)
        print(f"{job.result} {job.item_id}", flush=True)


if __name__ == "__main__":
    main()
