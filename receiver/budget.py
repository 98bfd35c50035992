"""When the next attempt is due, and what happens when a service's repairs keep failing.

docs/design.md, "The repair model": after an attempt the next one is due ``receiver.cooldown``
after its end; at most ``attempts.max`` attempts within ``attempts.window``; past that
the service is *exhausted* (ERROR log, ``caretaker_remediation_attempts_exhausted`` 1,
the alert ``CaretakerRepairsExhausted`` in Alertmanager) and attempts go on with capped
exponential backoff (``receiver.backoff``) until an operator resets the budget or the
service has been healthy for ``attempts.healthy_for``. A reset makes the next attempt
due at once.

The schedule (``next_attempt_at``, ``backoff_step``, ``exhausted_since``) is in the
state file's ``services`` table; the attempts counted are the
:class:`~receiver.state.RepairState`'s. Every time comes from the injected ``clock``
(Unix seconds), so a test can move time on instead of waiting for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from exporter.config import HOST_LABEL

from .alertmanager import post_alert
from .observe import observe
from .parts import Parts
from .store import ServiceState
from .vocabulary import RepairResult

__all__ = ["EXHAUSTED_ALERT", "EXHAUSTED_REPOST_SECONDS", "Budget"]

log = logging.getLogger(__name__)

EXHAUSTED_REPOST_SECONDS = 60.0
"""How often the exhausted alert is posted again while it lasts (Alertmanager resolves
an alert not re-posted within its endsAt, set to three times this)."""
EXHAUSTED_ALERT = "CaretakerRepairsExhausted"


class Budget:
    """The schedule of attempts and the attempt budget of every service.

    ``wake(service)`` is called after a reset, so the service's worker looks at once.
    Raises :class:`~receiver.shared.SharedStateError` where the state does (Redis down)
    and ``sqlite3.Error`` from the state file.
    """

    def __init__(self, parts: Parts, wake: Callable[[str], None]) -> None:
        self.config, self.store, self.state = parts.config, parts.store, parts.state
        self.ctx, self.metrics, self.clock = parts.ctx, parts.metrics, parts.clock
        self.wake = wake
        self.exhausted: dict[str, datetime] = {}
        """Services whose budget is spent, and since when."""
        self._healthy_since: dict[str, float] = {}
        self._last_post = 0.0

    def restore(self, service: str, state: ServiceState) -> None:
        """At start: the service's budget was spent before the restart (``state`` read
        from the state file)."""
        if state.exhausted_since is not None:
            self.exhausted[service] = datetime.fromtimestamp(state.exhausted_since, UTC)
            self.metrics.exhausted.labels(service).set(1)

    # --- when the next attempt is due ------------------------------------------------------------
    async def due_in(self, service: str, state: ServiceState, now: float, action: str) -> float:
        """Seconds until the next attempt of ``service`` with ``action`` is due (0: now).

        The cooldown spaces out repeats of a repair; after a successful one, a different
        repair (the restart after a restored file) is not held back by it. Backoff
        holds back every repair of an exhausted service."""
        if state.exhausted_since is None and state.last_result == RepairResult.SUCCESS \
                and state.last_action != action:
            return 0.0
        recv = self.config.receiver
        due = state.next_attempt_at
        if state.exhausted_since is None:
            last = await self.state.last_finished(service)
            if last is not None:
                due = max(due, last + recv.cooldown)
        # Capped: a time written while the clock was ahead (no RTC, before NTP) must not
        # hold repairs back until real time catches up.
        return max(0.0, min(due - now, max(recv.backoff.max, recv.cooldown)))

    async def spent(self, service: str, now: float) -> bool:
        """Whether ``attempts.max`` repairs of ``service`` started within ``attempts.window`` before ``now``."""
        attempts = self.config.receiver.attempts
        return await self.state.repairs_since(service, now - attempts.window) >= attempts.max

    def after_attempt(self, service: str, state: ServiceState, action: str, result: RepairResult) -> None:
        """Schedule the next attempt after one that just ended: ``cooldown`` later, or
        while exhausted ``backoff.initial * 2**step`` later (capped at ``backoff.max``)."""
        finished = self.clock()
        last = {"last_action": action, "last_result": result}
        if state.exhausted_since is not None:
            backoff = self.config.receiver.backoff
            delay = min(backoff.max, backoff.initial * 2 ** max(0, state.backoff_step))
            self._set_next(service, finished + delay, backoff_step=state.backoff_step + 1, **last)
        else:
            self._set_next(service, finished + self.config.receiver.cooldown, **last)

    async def enter_backoff(self, service: str) -> float:
        """The budget is spent: say so loudly (:meth:`exhaust`) and space the next
        attempts out. Returns the seconds to the next one (``backoff.initial``)."""
        await self.exhaust(service)
        delay = self.config.receiver.backoff.initial
        self._set_next(service, self.clock() + delay, backoff_step=1)
        return delay

    def _set_next(self, service: str, at: float, **fields: Any) -> None:
        self.store.set_service_state(service, next_attempt_at=at, **fields)
        self.metrics.next_attempt.labels(service).set(at)

    # --- exhausted --------------------------------------------------------------------------------
    async def exhaust(self, service: str) -> None:
        """Mark ``service`` exhausted (once: an ERROR log, the state file, the alert posted)."""
        if service not in self.exhausted:
            attempts = self.config.receiver.attempts
            backoff = self.config.receiver.backoff
            log.error("REPAIRS EXHAUSTED for %s: %d repairs within %.0fs; trying again with backoff (%.0fs doubling "
                      "to %.0fs) until it has been healthy for %.0fs or an operator resets it "
                      "(POST /api/v1/services/%s/reset). A person should look at it.", service, attempts.max,
                      attempts.window, backoff.initial, backoff.max, attempts.healthy_for, service)
            now = datetime.fromtimestamp(self.clock(), UTC)
            self.exhausted[service] = now
            self.store.set_service_state(service, exhausted_since=now.timestamp())
            await self.post(service, firing=True)
        self.metrics.exhausted.labels(service).set(1)

    async def post(self, service: str, firing: bool) -> None:
        """Post ``CaretakerRepairsExhausted`` for an exhausted service to Alertmanager
        (``receiver.alertmanager_url``), firing (ending three repost intervals from now)
        or resolved; nothing without a URL. Errors are logged by the client."""
        url = self.config.receiver.alertmanager_url
        if not url or service not in self.exhausted:
            return
        attempts = self.config.receiver.attempts
        await post_alert(
            self.ctx.session, url,
            {"alertname": EXHAUSTED_ALERT, "service_name": service, "severity": "critical",
             "source": "caretaker-receiver", HOST_LABEL: self.config.receiver.host},
            {"summary": f"caretaker's repairs of {service} keep failing",
             "description": f"{service} used its repair budget ({attempts.max} within {attempts.window:g}s). "
                            "caretaker keeps trying with exponential backoff until it has been healthy for "
                            f"{attempts.healthy_for:g}s or an operator resets it.",
             "runbook_url": "docs/runbook.md#caretakerrepairsexhausted"},
            self.exhausted[service], timedelta(seconds=3 * EXHAUSTED_REPOST_SECONDS) if firing else None)

    async def reset(self, service: str, reason: str) -> bool:
        """Re-enable repairs of ``service`` at once: forget its attempts for the budget,
        end its backoff, resolve its exhausted alert. True if its budget was spent."""
        was = service in self.exhausted
        now = self.clock()
        self.store.set_service_state(service, exhausted_since=None, backoff_step=0, next_attempt_at=0.0)
        self.metrics.next_attempt.labels(service).set(0)
        await self.state.reset_budget(service, now, reason)
        if was:
            await self.post(service, firing=False)
            del self.exhausted[service]
            log.warning("repairs of %s re-enabled: %s", service, reason)
        self._healthy_since.pop(service, None)
        self.metrics.exhausted.labels(service).set(0)
        self.wake(service)
        return was

    async def watch_once(self) -> None:
        """Reset each exhausted service that has been healthy for ``attempts.healthy_for``
        (observed now, and at every earlier call since it became healthy), and post the
        exhausted alerts again every :data:`EXHAUSTED_REPOST_SECONDS`."""
        now = self.clock()
        for service in list(self.exhausted):
            if (await observe(self.ctx, service)).healthy:
                since = self._healthy_since.setdefault(service, now)
                if now - since >= self.config.receiver.attempts.healthy_for:
                    await self.reset(service, f"healthy for {now - since:.0f}s")
            else:
                self._healthy_since.pop(service, None)
        if self.exhausted and now - self._last_post >= EXHAUSTED_REPOST_SECONDS:
            self._last_post = now
            for service in list(self.exhausted):
                await self.post(service, firing=True)
