"""What one receiver keeps alone and an HA pair shares: one interface, two implementations.

docs/design.md ("Many hosts"): two receivers behind two Alertmanagers must still act
on each alert once, repair a service one at a time, and spend one attempt budget. The
executor asks the :class:`RepairState` it was given; which one is chosen once, where
the app is wired (``receiver.shared_state`` set: Redis).

==================  ======================================  ==========================================
idea                :class:`LocalState` (SQLite)            :class:`~receiver.shared.SharedState` (Redis)
==================  ======================================  ==========================================
claim an alert      the audit row's dedupe (at admission)   ``SET NX EX`` per alert
repair lock         the service's one worker                ``SET NX PX`` with a token
record start, end   the repair's audit row (runner.py)      a sorted set of starts; the last end
repairs in window   audit rows ``acted`` since the reset    ``ZCOUNT`` since the reset
last repair's end   None: the worker's own schedule         the last end any receiver recorded
reset the budget    the ``resets`` table                    ``resets`` table and a key
==================  ======================================  ==========================================

Each receiver keeps its own audit trail, problems and schedule (``services`` table)
in its state file in both cases. Times are Unix seconds (float). The Redis
implementation raises :class:`~receiver.shared.SharedStateError` when Redis cannot be
reached; the local one raises only ``sqlite3.Error`` from its state file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .payload import Alert, Decision
from .store import Store

__all__ = ["LocalState", "RepairState"]

LOCAL_LOCK = "local"
"""The lock token of :class:`LocalState`: there is nothing to take."""


class RepairState(Protocol):
    """The state that decides whether and when this receiver may repair a service."""

    async def claim(self, alerts: Sequence[Alert], decisions: list[Decision]) -> list[Decision]:
        """Claim the alerts this receiver would act on (``decisions[i].acts``), before
        anything about them is recorded. Returns ``decisions``, where an alert another
        receiver claimed first has the reason ``duplicate``. Called once per webhook
        notification: it must not cost a look per alert when nothing is shared."""
        ...

    async def acquire(self, service: str, lease_seconds: float) -> str | None:
        """Take the repair lock of ``service`` for at most ``lease_seconds``: a token to
        :meth:`release` it with, or None while another receiver holds it."""
        ...

    async def release(self, service: str, token: str) -> None:
        """Give the lock back, if ``token`` still holds it (a lease that ran out and was
        taken by another receiver is left alone)."""
        ...

    async def record_start(self, service: str, started: float) -> None:
        """A repair of ``service`` started at ``started``; called after its audit row
        (decision ``acted``, ``started_at``) is written. It counts in the budget."""
        ...

    async def record_finish(self, service: str, finished: float) -> None:
        """The repair ended at ``finished``; called after its audit row is final."""
        ...

    async def repairs_since(self, service: str, since: float) -> int:
        """Repairs of ``service`` started at or after ``since`` and after the last
        :meth:`reset_budget` (the attempt budget)."""
        ...

    async def last_finished(self, service: str) -> float | None:
        """When the last repair of ``service`` ended, for the cooldown, where the
        worker's own schedule (``next_attempt_at``, written after each of its attempts)
        may not know it: another receiver repaired it. None: nothing beyond that schedule."""
        ...

    async def reset_budget(self, service: str, now: float, reason: str) -> None:
        """Forget the repairs of ``service`` so far for its budget and its cooldown (an
        operator's reset, or health for ``attempts.healthy_for``); ``reason`` is kept in the
        state file."""
        ...


class LocalState:
    """:class:`RepairState` for a receiver that is alone: its state file is the truth.

    The audit trail already holds everything: an alert is claimed when its audit row is
    written (a second one is a duplicate there), one worker per service is the lock, and
    the budget counts the audit rows of repairs. Reads run on the store's thread.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    async def claim(self, alerts: Sequence[Alert], decisions: list[Decision]) -> list[Decision]:
        return decisions

    async def acquire(self, service: str, lease_seconds: float) -> str | None:
        return LOCAL_LOCK

    async def release(self, service: str, token: str) -> None:
        return None

    async def record_start(self, service: str, started: float) -> None:
        return None  # the audit row is the record

    async def record_finish(self, service: str, finished: float) -> None:
        return None  # the audit row is the record

    async def repairs_since(self, service: str, since: float) -> int:
        return await self.store.off_loop(self.store.repairs_since, service, since)

    async def last_finished(self, service: str) -> float | None:
        return None  # this receiver's own cooldown is in its schedule

    async def reset_budget(self, service: str, now: float, reason: str) -> None:
        self.store.reset_budget(service, now, reason)
