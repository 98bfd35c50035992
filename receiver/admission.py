"""Admission: the audit rows of a webhook notification, committed in groups.

The webhook's hot path (README, "Webhook throughput"): for every alert one
:class:`~receiver.store.NewAlert`, and for the notifications of one turn of the event
loop one SQLite transaction. Nothing here may cost more per alert than it does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from exporter.config import HOST_LABEL

from .payload import Alert, Decision
from .store import NewAlert, Store
from .vocabulary import AuditDecision, Reason

__all__ = ["AGGREGATED", "RECORDED_AS", "Admission", "GroupCommit", "HostSkips", "QueueFull", "audit_rows"]

log = logging.getLogger(__name__)

# Plain values, bound once: these are compared and written for every alert (see receiver.vocabulary).
_SKIPPED = AuditDecision.SKIPPED.value
_DUPLICATE = Reason.DUPLICATE.value
_OTHER_HOST, _NO_HOST = Reason.OTHER_HOST.value, Reason.NO_HOST.value

AGGREGATED = frozenset(r.value for r in (Reason.NO_SERVICE_NAME, Reason.UNKNOWN_SERVICE, Reason.UNKNOWN_ACTION,
                                         Reason.ACTION_NOT_ALLOWED, Reason.OTHER_HOST, Reason.NO_HOST))
"""Reasons of alerts the receiver will never act on, whatever the world: recorded as one
audit row per reason, status and hour (with a count), not one row each."""
RECORDED_AS = {"": AuditDecision.QUEUED.value, Reason.RESOLVED.value: AuditDecision.RECORDED.value,
               Reason.NO_REMEDIATION.value: AuditDecision.RECORDED.value}
"""The audit decision of a new alert by its decision's reason; any other reason is ``skipped``."""


@dataclass(frozen=True)
class Admission:
    """What the webhook did with a notification (its JSON answer)."""

    received: int
    duplicates: int
    queued: int
    skipped: int

    def as_json_bytes(self) -> bytes:
        """The webhook's answer, ``{"status": "success", "received": N, ...}``, written
        directly: json.dumps of this small dict was a tenth of a request's CPU time."""
        return (f'{{"status": "success", "received": {self.received}, "duplicates": {self.duplicates}, '
                f'"queued": {self.queued}, "skipped": {self.skipped}}}').encode()


class QueueFull(Exception):
    """Too many repairs are pending; the webhook answers 503 so Alertmanager retries."""


class HostSkips:
    """Alerts about another host (``other_host``) or none (``no_host``): what their hourly
    audit row keeps, and a WARNING that says so.

    A receiver that gets them repairs nothing for them, and a wrong ``receiver.host`` or a
    wrong route makes it get all of its host's: so the first of each (reason, host value)
    is a WARNING naming the alert's host and ``receiver.host``, again at most every
    ``warn_every`` seconds (``clock``, Unix seconds). Each row's observation names the host
    values its alerts carried (:attr:`NewAlert.observation <receiver.store.NewAlert.observation>`);
    a value is passed on once per row (the store merges them), so a steady stream of one
    misrouted host costs nothing more per alert than before.
    """

    MAX_HOSTS = 20
    """Host values kept per row (the store keeps at most as many)."""
    MAX_WARNED = 256
    """(reason, host) pairs remembered for the rate limit; past it, all are forgotten."""

    def __init__(self, receiver_host: str, fleet: bool, clock: Callable[[], float], warn_every: float = 600.0) -> None:
        self.receiver_host = receiver_host
        self.fleet = fleet
        self.clock = clock
        self.warn_every = warn_every
        self._warned: dict[tuple[str, str], float] = {}
        self._rows: dict[tuple[str, str, str], set[str]] = {}

    def observation(self, alert: Alert, reason: str, row: tuple[str, str, str]) -> str:
        """The observation (JSON) of the aggregated ``row`` (fingerprint, hour, status) for
        ``alert``, or ``null`` if the row has its host already; logs the WARNING when due."""
        host = alert.labels.get(HOST_LABEL, "")
        self._warn(alert, reason, host)
        seen = self._rows.get(row)
        if seen is None:
            self._rows = {k: v for k, v in self._rows.items() if k[1] == row[1]}  # forget the past hours
            seen = self._rows[row] = set()
        elif host in seen or len(seen) >= self.MAX_HOSTS:
            return "null"
        hosts = [host] if host else []
        seen.add(host)
        return json.dumps({"receiver_host": self.receiver_host, "fleet": self.fleet, "hosts": hosts})

    def _warn(self, alert: Alert, reason: str, host: str) -> None:
        now = self.clock()
        key = (reason, host)
        last = self._warned.get(key)
        if last is not None and now - last < self.warn_every:
            return
        if len(self._warned) >= self.MAX_WARNED:
            self._warned.clear()
        self._warned[key] = now
        minutes = f"{self.warn_every / 60:g}"
        if reason == _OTHER_HOST:
            log.warning("alert %s (%s) is about host %r, and this receiver repairs host %r (receiver.host): not "
                        "acting (other_host). If %r is this host's name in Prometheus's targets, set receiver.host "
                        "to it; if not, an Alertmanager route sends another host's alerts here (docs/fleet.md). "
                        "More of these within %s minutes are only counted "
                        "(caretaker_alerts_skipped_total{reason=\"other_host\"})",
                        alert.alertname, alert.fingerprint, host, self.receiver_host, host, minutes)
        else:
            log.warning("alert %s (%s) has no host label, and this receiver (receiver.host %r) is in fleet mode "
                        "(receiver.fleet), where every alert must name its host: not acting (no_host). Give this "
                        "host's targets a host label in Prometheus (docs/fleet.md). More of these within %s "
                        "minutes are only counted (caretaker_alerts_skipped_total{reason=\"no_host\"})",
                        alert.alertname, alert.fingerprint, self.receiver_host, minutes)


def audit_rows(alerts: Sequence[Alert], decisions: Sequence[Decision], clock: Callable[[], float],
               hosts: HostSkips | None = None) -> list[NewAlert]:
    """One row per alert, with its decision (``decisions[i]`` is about ``alerts[i]``).

    An alert in :data:`AGGREGATED` gets the row ``~<reason>`` of the current hour (UTC,
    from ``clock``, Unix seconds): "~" is not a fingerprint character, so such rows
    never meet a real alert's. With ``hosts``, one about another host or none gets the
    observation :meth:`HostSkips.observation` gives. The labels (JSON) go along with an
    alert that acts, and with a ``duplicate`` another receiver owns: it still refreshes
    this receiver's problem for it, if it has one.
    """
    hour = ""
    rows = []
    for a, d in zip(alerts, decisions, strict=True):
        if d.reason in AGGREGATED:
            # One row per reason, status and hour, however many such alerts come (a
            # fuzzer, a misrouted Alertmanager): times_seen counts them.
            hour = hour or time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(clock()))
            fingerprint = f"~{d.reason}"
            seen = "null"
            if hosts is not None and d.reason in (_OTHER_HOST, _NO_HOST):
                seen = hosts.observation(a, d.reason, (fingerprint, hour, a.status))
            rows.append(NewAlert(fingerprint, hour, a.status, a.alertname[:200], d.service_name, d.action,
                                 _SKIPPED, d.reason, "", seen))
        else:
            rows.append(NewAlert(a.fingerprint, a.starts_at_key, a.status, a.alertname[:200], d.service_name,
                                 d.action, RECORDED_AS.get(d.reason, _SKIPPED), d.reason,
                                 json.dumps(a.labels) if d.acts or d.reason == _DUPLICATE else ""))
    return rows


class GroupCommit:
    """Write the rows of the notifications that arrive in one turn of the event loop
    together, in one transaction, on the loop itself.

    A commit without fsync costs tens of microseconds; handing each one to a thread cost
    more than that in wake-ups and GIL hand-offs (measured with bench/webhook.py). Each
    request still answers only after its commit. ``clock`` gives the rows' time (Unix
    seconds).
    """

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self._waiting: list[tuple[list[NewAlert], asyncio.Future[list[int | None]]]] = []

    async def write(self, rows: list[NewAlert]) -> list[int | None]:
        """Per row, the new audit entry's id, or None for an alert already seen (see
        :meth:`Store.admit_many <receiver.store.Store.admit_many>`). Raises what the
        store raises (``sqlite3.Error``, ``MemoryError``...) for every request of the
        group: nothing of the group is recorded."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int | None]] = loop.create_future()
        self._waiting.append((rows, future))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            results = self.store.admit_many([rows for rows, _ in batch], self.clock())
        except Exception as err:  # sqlite3.Error, MemoryError...: every waiting request answers 503
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), ids in zip(batch, results, strict=True):
            if not future.done():  # a request whose client went away is cancelled; its rows stay
                future.set_result(ids)
