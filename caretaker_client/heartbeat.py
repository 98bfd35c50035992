"""Heartbeats that prove progress: the app's work loop beats, a sender reports.

A heartbeat fed from a thread of its own says only that the thread runs: a work loop
deadlocked on a lock would keep it fresh. Here the work loop itself calls
:meth:`Heartbeat.beat` (as a systemd service calls ``sd_notify("WATCHDOG=1")`` from its
main loop), and the sender reports to caretaker's exporter only when the loop has
beaten since its last report. A loop that stops making progress stops the reports,
the heartbeat goes stale, and ``CaretakerHeartbeatMissing`` fires, even though the
process and all its threads are alive.

Threads (workers, scripts, Flask)::

    from caretaker_client import Heartbeat
    heartbeat = Heartbeat("worker").start()    # the sender: a daemon thread
    while True:
        do_one_job()
        heartbeat.beat()                       # cheap, never blocks, never raises

A process forked after :meth:`Heartbeat.start` (a gunicorn worker of an app loaded
before the fork, ``--preload``) gets a sender thread of its own at the fork
(``os.register_at_fork``), which reports that worker's pid and beats.

asyncio (uvicorn, aiohttp)::

    heartbeat = Heartbeat("api")
    app.state.heartbeat = asyncio.create_task(heartbeat.run_async())   # keep the task
    ...                                        # heartbeat.beat() from the loop's work

(create the task in the worker's own event loop, at its startup: a task does not follow
a fork).

A report is ``POST /heartbeat/NAME?pid=PID&beats=N`` on the exporter (N: beats since
the previous report), sent at once for the first beat, then at most once per
``interval`` seconds. The exporter's URL is ``CARETAKER_EXPORTER_URL`` (default
``http://127.0.0.1:8930``). Choose the heartbeat's ``timeout`` in caretaker's config
to be a few intervals plus the longest time one iteration of the loop may take.

Nothing here blocks the app or raises into it: a report that fails (exporter down,
slow, refusing) is logged at DEBUG and its beats are dropped; the next beats are
reported at the next interval. Standard library only: the app needs nothing else
of caretaker on its path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import threading
import time
import urllib.parse
import urllib.request
import weakref

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_URL", "URL_VARIABLE", "Heartbeat", "exporter_url", "send"]

log = logging.getLogger(__name__)

URL_VARIABLE = "CARETAKER_EXPORTER_URL"
"""The environment variable with the exporter's URL."""
DEFAULT_URL = "http://127.0.0.1:8930"
"""The exporter's URL when :data:`URL_VARIABLE` is unset or empty."""
DEFAULT_INTERVAL = 10.0
"""Seconds between two reports while the loop beats."""
FIRST_POLL = 0.1
"""Seconds between the sender's looks for the first beat, so that a freshly started
app is reported (and a restart verified) without waiting a whole interval."""


def exporter_url() -> str:
    """The exporter's base URL: ``$CARETAKER_EXPORTER_URL``, else :data:`DEFAULT_URL`."""
    return os.environ.get(URL_VARIABLE) or DEFAULT_URL


def send(name: str, url: str | None = None, fail: bool = False, pid: int | None = None, timeout: float = 2.0,
         beats: int = 0) -> bool:
    """One report to the exporter: ``POST {url}/heartbeat/{name}[/fail]?pid=PID[&beats=N]``.

    ``url`` defaults to :func:`exporter_url`; ``pid`` to this process's; ``beats`` (when
    positive) is how many times the work loop beat since the previous report; ``fail``
    reports trouble instead (``CaretakerHeartbeatFailing``). Blocks up to ``timeout``
    seconds. True when the exporter took it (2xx); never raises.
    """
    url = exporter_url() if url is None else url
    if not url.startswith(("http://", "https://")):
        log.debug("caretaker heartbeat %s not sent: %r is not an http(s) URL", name, url)
        return False
    path = f"/heartbeat/{urllib.parse.quote(name, safe='')}{'/fail' if fail else ''}"
    query = f"?pid={pid if pid is not None else os.getpid()}" + (f"&beats={beats}" if beats > 0 else "")
    request = urllib.request.Request(url.rstrip("/") + path + query, data=b"", method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - http(s) checked above
            return bool(200 <= resp.status < 300)
    except Exception as err:  # the app must never be hurt by its watchdog
        log.debug("caretaker heartbeat %s not sent: %s", name, err)
        return False


class Heartbeat:
    """One heartbeat of the app (``name`` as in caretaker's config): :meth:`beat` from the
    work loop, and a sender, :meth:`start` (a daemon thread) or :meth:`run_async` (a task).

    ``interval``: seconds between reports while the loop beats (default 10);
    ``timeout``: seconds one report may take (default 2). Both must be finite and more
    than 0, else ``ValueError`` (an interval of 0 would spin the sender at full CPU).
    """

    def __init__(self, name: str, url: str | None = None, interval: float = DEFAULT_INTERVAL,
                 timeout: float = 2.0) -> None:
        for option, value in (("interval", interval), ("timeout", timeout)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{option} must be a number of seconds more than 0, not {value!r}")
        self.name = name
        self.url = exporter_url() if url is None else url
        self.interval = interval
        self.timeout = timeout
        self.reports = 0
        """Reports the exporter took."""
        self._count = itertools.count(1)
        self._latest = 0
        """Ticket of the latest beat: a fresh number from ``_count`` per beat."""
        self._reported = 0
        """``_latest`` as it was at the last report."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Say "the loop made progress": call it from the work loop, once per iteration.

        No I/O and no lock: it takes a new ticket (``itertools.count``, atomic in
        CPython) and stores it; the sender reports later. Never blocks, never raises.
        """
        self._latest = next(self._count)

    def pending(self) -> int:
        """Beats since the last report (an estimate when several threads beat; never 0
        after a beat)."""
        latest = self._latest
        return 0 if latest == self._reported else max(1, latest - self._reported)

    def _take(self) -> int:
        """The beats to report now, marked as reported; 0 when there are none."""
        latest = self._latest
        beats = 0 if latest == self._reported else max(1, latest - self._reported)
        self._reported = latest
        return beats

    def _send(self, beats: int) -> bool:
        ok = send(self.name, self.url, timeout=self.timeout, beats=beats)
        self.reports += ok
        return ok

    def report(self) -> bool | None:
        """One round of the sender (blocking, up to ``timeout`` seconds): ``None`` when the
        loop has not beaten since the last report (nothing is sent), else whether the
        exporter took the report. Beats of a failed report are dropped: a later report
        must not vouch for a loop that may have stopped since."""
        beats = self._take()
        return self._send(beats) if beats else None

    def start(self) -> Heartbeat:
        """Start the sender in a daemon thread (once; later calls do nothing); returns self.
        A process forked afterwards (a gunicorn worker of a ``--preload`` app) gets a sender
        of its own, reporting its own pid and beats: threads do not survive ``fork()``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"caretaker-heartbeat-{self.name}", daemon=True)
            self._thread.start()
            _started.add(self)
        return self

    def _forked(self) -> None:
        """In a child just forked: its parent's sender thread is not here; start afresh."""
        self._count = itertools.count(1)
        self._latest = self._reported = 0
        self.reports = 0
        self._stop = threading.Event()
        self._thread = None
        self.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the sender thread (waits up to ``timeout`` seconds for it); beats not
        reported yet are not sent."""
        self._stop.set()
        _started.discard(self)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        wait, reported_once = FIRST_POLL, False
        while not self._stop.wait(wait):
            began = time.monotonic()
            if self.report() is None and not reported_once:
                continue  # still waiting for the first beat
            reported_once = True
            wait = max(0.0, self.interval - (time.monotonic() - began))

    async def run_async(self) -> None:
        """The sender as a coroutine for asyncio apps: run it as a task, cancel it to stop.
        A report runs in a thread (``asyncio.to_thread``), so a slow exporter never
        stalls the event loop."""
        loop = asyncio.get_running_loop()
        wait, reported_once = FIRST_POLL, False
        while True:
            await asyncio.sleep(wait)
            began = loop.time()
            beats = self._take()
            if beats:
                await asyncio.to_thread(self._send, beats)
            elif not reported_once:
                continue
            reported_once = True
            wait = max(0.0, self.interval - (loop.time() - began))


_started: weakref.WeakSet[Heartbeat] = weakref.WeakSet()
"""Heartbeats whose sender thread was started (and not stopped) in this process."""


def _after_fork_in_child() -> None:
    for heartbeat in list(_started):
        heartbeat._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
