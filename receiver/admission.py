"""Admission: the audit rows of a webhook notification, committed in groups.

The webhook's hot path (README, "Webhook throughput"): for every alert one
:class:`~receiver.store.NewAlert`, and for the notifications of one turn of the event
loop one SQLite transaction. Nothing here may cost more per alert than it does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .payload import Alert, Decision
from .store import NewAlert, Store
from .vocabulary import AuditDecision, Reason

__all__ = ["AGGREGATED", "RECORDED_AS", "Admission", "GroupCommit", "QueueFull", "audit_rows"]

# Plain values, bound once: these are compared and written for every alert (see receiver.vocabulary).
_SKIPPED = AuditDecision.SKIPPED.value
_DUPLICATE = Reason.DUPLICATE.value

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


def audit_rows(alerts: Sequence[Alert], decisions: Sequence[Decision], clock: Callable[[], float]) -> list[NewAlert]:
    """One row per alert, with its decision (``decisions[i]`` is about ``alerts[i]``).

    An alert in :data:`AGGREGATED` gets the row ``~<reason>`` of the current hour (UTC,
    from ``clock``, Unix seconds): "~" is not a fingerprint character, so such rows
    never meet a real alert's. The labels (JSON) go along with an alert that acts, and
    with a ``duplicate`` another receiver owns: it still refreshes this receiver's
    problem for it, if it has one.
    """
    hour = ""
    rows = []
    for a, d in zip(alerts, decisions, strict=True):
        if d.reason in AGGREGATED:
            # One row per reason, status and hour, however many such alerts come (a
            # fuzzer, a misrouted Alertmanager): times_seen counts them.
            hour = hour or time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(clock()))
            rows.append(NewAlert(f"~{d.reason}", hour, a.status, a.alertname[:200], d.service_name, d.action,
                                 _SKIPPED, d.reason))
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
