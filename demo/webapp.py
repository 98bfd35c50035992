"""A small web app for the local stack: the kind of service caretaker looks after.

Standard library only, so any ``python3`` runs it. ``GET /health`` answers 200 while
the app is responsive; ``GET /`` says hello. SIGTERM shuts it down gracefully.
With ``--heartbeat NAME`` its serving loop also beats a caretaker heartbeat (once per
turn of ``serve_forever``, reported to ``$CARETAKER_EXPORTER_URL``); that needs the
``caretaker_client`` package importable.
Freeze it with ``kill -STOP PID`` to see caretaker notice the failing probe, confirm
it and restart it (SIGTERM and SIGCONT, so the stopped process can act on SIGTERM at
once; SIGKILL only if it is still there after the grace period).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    started = time.time()

    def do_GET(self) -> None:
        if self.path == "/health":
            body = json.dumps({"status": "ok", "pid": os.getpid(), "uptime_seconds": time.time() - self.started})
        elif self.path == "/":
            body = json.dumps({"hello": "from the caretaker demo web app"})
        else:
            self.send_error(404)
            return
        data = body.encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.log_date_time_string()} {self.address_string()} {format % args}\n")


class Server(ThreadingHTTPServer):
    beat: Callable[[], None] | None = None

    def service_actions(self) -> None:  # called by serve_forever once per turn of its loop
        if self.beat is not None:
            self.beat()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8940)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--heartbeat", metavar="NAME", help="beat this caretaker heartbeat from the serving loop")
    args = parser.parse_args()
    server = Server((args.host, args.port), Handler)
    if args.heartbeat:
        from caretaker_client import Heartbeat  # noqa: PLC0415 - only then: without it any python3 runs the demo

        server.beat = Heartbeat(args.heartbeat, interval=5.0).start().beat

    def stop(signum: int, frame: object) -> None:
        print(f"webapp: got signal {signum}, shutting down", file=sys.stderr, flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"webapp: pid {os.getpid()} listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
