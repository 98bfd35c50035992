"""Feed a caretaker heartbeat from your app, in two lines, without ever hurting it.

Threads (Flask, workers, scripts)::

    from exporter.client import feed
    feed("worker")            # POSTs /heartbeat/worker?pid=... every 10 s in a daemon thread

asyncio (uvicorn, aiohttp)::

    from exporter.client import feed_async
    app.state.heartbeat = asyncio.create_task(feed_async("api"))   # keep the task

Neither blocks the app nor raises into it: a failed POST is logged at DEBUG and
retried at the next interval. Standard library only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import urllib.parse
import urllib.request

__all__ = ["Feeder", "feed", "feed_async", "send"]

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8930"


def send(name: str, url: str = DEFAULT_URL, fail: bool = False, pid: int | None = None, timeout: float = 2.0) -> bool:
    """One heartbeat (or failure report). True when the exporter took it; never raises."""
    if not url.startswith(("http://", "https://")):
        log.debug("caretaker heartbeat %s not sent: %r is not an http(s) URL", name, url)
        return False
    path = f"/heartbeat/{urllib.parse.quote(name, safe='')}{'/fail' if fail else ''}"
    query = f"?pid={pid if pid is not None else os.getpid()}"
    request = urllib.request.Request(url.rstrip("/") + path + query, data=b"", method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - http(s) checked above
            return bool(200 <= resp.status < 300)
    except Exception as err:  # the app must never be hurt by its watchdog
        log.debug("caretaker heartbeat %s not sent: %s", name, err)
        return False


class Feeder:
    """Sends a heartbeat every ``interval`` seconds from a daemon thread."""

    def __init__(self, name: str, url: str = DEFAULT_URL, interval: float = 10.0) -> None:
        self.name, self.url, self.interval = name, url, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"caretaker-heartbeat-{name}", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            send(self.name, self.url)
            self._stop.wait(self.interval)


def feed(name: str, url: str = DEFAULT_URL, interval: float = 10.0) -> Feeder:
    """Start feeding heartbeat ``name``; returns the running :class:`Feeder`."""
    return Feeder(name, url, interval).start()


async def feed_async(name: str, url: str = DEFAULT_URL, interval: float = 10.0) -> None:
    """Feed heartbeat ``name`` forever (cancel the task to stop). The POST runs in a
    thread, so a slow exporter never stalls the event loop."""
    while True:
        await asyncio.to_thread(send, name, url)
        await asyncio.sleep(interval)
