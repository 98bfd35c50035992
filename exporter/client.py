"""Deprecated: use :mod:`caretaker_client` (``Heartbeat("NAME").start()`` and
``heartbeat.beat()`` in the work loop).

``feed()`` and ``feed_async()`` post a heartbeat every ``interval`` seconds from a
thread or task of their own, whatever the app's work loop is doing: they prove that
the process runs, not that it makes progress. A worker whose loop deadlocked keeps
feeding them, and ``CaretakerHeartbeatMissing`` never fires. They are kept, unchanged
in what they send, so that existing apps keep working, and issue a
``DeprecationWarning``. ``send`` is :func:`caretaker_client.heartbeat.send`.

The URL defaults to ``$CARETAKER_EXPORTER_URL``, else ``http://127.0.0.1:8930``.
Neither blocks the app nor raises into it: a failed POST is logged at DEBUG and
retried at the next interval. Standard library only.
"""

from __future__ import annotations

import asyncio
import threading
import warnings

from caretaker_client.heartbeat import DEFAULT_URL, exporter_url, send

__all__ = ["DEFAULT_URL", "Feeder", "feed", "feed_async", "send"]

DEPRECATED = ("exporter.client feeds a heartbeat from its own thread and cannot prove that the app's work loop "
              "makes progress; use caretaker_client.Heartbeat and call beat() from the loop")


class Feeder:
    """Sends a heartbeat every ``interval`` seconds from a daemon thread (deprecated: it
    cannot prove progress; see :class:`caretaker_client.Heartbeat`)."""

    def __init__(self, name: str, url: str | None = None, interval: float = 10.0) -> None:
        warnings.warn(DEPRECATED, DeprecationWarning, stacklevel=2)
        self.name, self.url, self.interval = name, exporter_url() if url is None else url, interval
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


def feed(name: str, url: str | None = None, interval: float = 10.0) -> Feeder:
    """Start feeding heartbeat ``name``; returns the running :class:`Feeder` (deprecated:
    it cannot prove progress)."""
    warnings.warn(DEPRECATED, DeprecationWarning, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return Feeder(name, url, interval).start()


async def feed_async(name: str, url: str | None = None, interval: float = 10.0) -> None:
    """Feed heartbeat ``name`` forever (cancel the task to stop); the POST runs in a
    thread. Deprecated: it cannot prove progress; see
    :meth:`caretaker_client.Heartbeat.run_async`."""
    warnings.warn(DEPRECATED, DeprecationWarning, stacklevel=2)
    url = exporter_url() if url is None else url
    while True:
        await asyncio.to_thread(send, name, url)
        await asyncio.sleep(interval)
