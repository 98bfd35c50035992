"""The executor: from a validated notification to repairs, safely.

- **Dedupe.** Each alert is admitted once per ``(fingerprint, startsAt, status)``, in
  SQLite, before the webhook answers; resends and retries are counted, not re-run.
- **One repair at a time per service** (a lock per service) and at most
  ``receiver.workers`` repairs at once overall (a semaphore).
- **Cooldown.** No repair of a service starts within ``receiver.cooldown`` seconds of
  the end of the previous one.
- **Attempt budget.** At most ``receiver.attempts.max`` repairs of a service within
  ``receiver.attempts.window`` seconds; past that the repair is skipped, logged at
  ERROR and ``caretaker_remediation_attempts_exhausted{service_name}`` is 1.
- **Audit.** Every decision is a row in the audit trail; the steps of a repair are
  written as it goes, so a crash leaves a trace (marked ``interrupted`` at start-up).

Cooldown and budget are read from the store, so they survive a receiver restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from exporter.config import Config

from .actions import ActionContext, RepairFailed, StepLog, run_action
from .payload import SKIP_REASONS, Alert, decide
from .store import AuditEntry, NewAlert, Store

__all__ = ["Admission", "Executor", "ReceiverMetrics"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PENDING = 1000


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not write repair steps to the store: %s", future.exception())


class ReceiverMetrics:
    """The receiver's own metrics, on the app's registry; label sets pre-initialised."""

    def __init__(self, registry: CollectorRegistry, config: Config) -> None:
        self.alerts = Counter("caretaker_alerts_received", "Alerts received in webhook notifications.",
                              ["status"], registry=registry)
        self.skipped = Counter("caretaker_alerts_skipped",
                               "Alerts not acted on, by reason (service_name empty when unknown).",
                               ["service_name", "reason"], registry=registry)
        self.remediations = Counter("caretaker_remediations", "Repairs run, by result.",
                                    ["action", "service_name", "result"], registry=registry)
        self.duration = Histogram("caretaker_remediation_duration_seconds",
                                  "Time from the start of a repair to its verified end.", ["action"],
                                  buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=registry)
        self.in_progress = Gauge("caretaker_remediations_in_progress", "Repairs running now.", registry=registry)
        self.exhausted = Gauge("caretaker_remediation_attempts_exhausted",
                               "1 while the service's attempt budget is spent and repairs are refused.",
                               ["service_name"], registry=registry)
        self.requests = Counter("caretaker_webhook_requests", "Webhook requests, by HTTP status code.",
                                ["code"], registry=registry)
        for status in ("firing", "resolved"):
            self.alerts.labels(status)
        for name, svc in config.services.items():
            self.exhausted.labels(name)
            for action in svc.remediation.allow:
                self.duration.labels(action)
                for result in ("success", "failure"):
                    self.remediations.labels(action, name, result)
            for reason in SKIP_REASONS:
                self.skipped.labels(name, reason)


@dataclass(frozen=True)
class Admission:
    """What the webhook did with a notification (its JSON answer)."""

    received: int
    duplicates: int
    queued: int
    skipped: int

    def as_json(self) -> dict[str, int]:
        return self.__dict__.copy()


class QueueFull(Exception):
    """Too many repairs are pending; the webhook answers 503 so Alertmanager retries."""


class Executor:
    def __init__(self, config: Config, store: Store, ctx: ActionContext, metrics: ReceiverMetrics,
                 clock: Callable[[], float] = time.time, dry_run: bool = False) -> None:
        self.config = config
        self.store = store
        self.ctx = ctx
        self.metrics = metrics
        self.clock = clock
        self.dry_run = dry_run
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caretaker-store")
        self._locks: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in config.services}
        self._slots = asyncio.Semaphore(config.receiver.workers)
        self._tasks: set[asyncio.Task[None]] = set()

    async def db(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call on the store's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, lambda: func(*args, **kwargs))

    async def start(self) -> None:
        """Mark what a previous run left half-done (see :meth:`Store.mark_interrupted`)."""
        for entry in await self.db(self.store.mark_interrupted, self.clock()):
            if entry.state == "interrupted":
                log.error("repair #%d (%s of %s) was interrupted by a receiver restart; not repeating it. "
                          "The service's alerts will ask again if it is still broken.",
                          entry.id, entry.action, entry.service_name)
                self.metrics.remediations.labels(entry.action, entry.service_name, "failure").inc()

    async def stop(self) -> None:
        """Cancel repairs in flight (they will be marked interrupted on the next start)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._db_thread.shutdown(wait=True)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def admit(self, alerts: Sequence[Alert]) -> Admission:
        """Dedupe, decide and record every alert; queue the repairs. Raises ``QueueFull``."""
        if self.pending >= MAX_PENDING:
            raise QueueFull(f"{self.pending} repairs pending")
        decisions = [decide(a, self.config) for a in alerts]
        rows = [NewAlert(a.fingerprint, a.starts_at_key, a.status, a.alertname[:200], d.service_name, d.action,
                         "queued" if d.acts else ("recorded" if d.reason in ("resolved", "no_remediation")
                                                  else "skipped"), d.reason)
                for a, d in zip(alerts, decisions, strict=True)]
        ids = await self.db(self.store.admit, rows, self.clock())
        duplicates = queued = skipped = 0
        for alert, decision, entry_id in zip(alerts, decisions, ids, strict=True):
            self.metrics.alerts.labels(alert.status).inc()
            if entry_id is None:
                duplicates += 1
                self.metrics.skipped.labels(decision.service_name, "duplicate").inc()
                continue
            if not decision.acts:
                skipped += 1
                self.metrics.skipped.labels(decision.service_name, decision.reason).inc()
                if decision.reason not in ("resolved", "no_remediation"):
                    log.info("alert %s (%s): not acting: %s", alert.alertname, alert.fingerprint, decision.reason)
                continue
            queued += 1
            task = asyncio.create_task(self._repair(entry_id, decision.service_name, decision.action))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return Admission(len(alerts), duplicates, queued, skipped)

    async def _skip(self, entry_id: int, service: str, reason: str) -> None:
        self.metrics.skipped.labels(service, reason).inc()
        await self.db(self.store.update, entry_id, decision="skipped", reason=reason, state="done")

    async def _repair(self, entry_id: int, service: str, action: str) -> None:
        async with self._locks[service], self._slots:
            recv = self.config.receiver
            now = self.clock()
            last = await self.db(self.store.last_repair_finished, service)
            if last is not None and now - last < recv.cooldown:
                log.info("%s of %s skipped: cooldown (%.0fs left)", action, service, recv.cooldown - (now - last))
                await self._skip(entry_id, service, "cooldown")
                return
            attempts = await self.db(self.store.repairs_since, service, now - recv.attempts.window)
            if attempts >= recv.attempts.max:
                self.metrics.exhausted.labels(service).set(1)
                log.error("REPAIRS EXHAUSTED for %s: %d repairs in the last %.0fs; not repairing it again "
                          "until the window passes. A person should look at it.", service, attempts,
                          recv.attempts.window)
                await self._skip(entry_id, service, "budget_exhausted")
                return
            self.metrics.exhausted.labels(service).set(0)
            if self.dry_run:
                log.info("dry run: would %s %s", action, service)
                await self._skip(entry_id, service, "dry_run")
                return
            await self._run(entry_id, service, action)

    async def _run(self, entry_id: int, service: str, action: str) -> None:
        started = self.clock()
        await self.db(self.store.update, entry_id, decision="acted", state="running", started_at=started)
        loop = asyncio.get_running_loop()

        def persist(current: list[dict[str, Any]]) -> None:
            # Written as the repair goes, so a crash mid-repair leaves its trace.
            snapshot = list(current)
            future = loop.run_in_executor(self._db_thread, lambda: self.store.update(entry_id, steps=snapshot))
            future.add_done_callback(_log_failure)

        steps = StepLog(on_step=persist)
        log.info("%s of %s: starting (audit #%d)", action, service, entry_id)
        self.metrics.in_progress.inc()
        result = "failure"
        try:
            await run_action(self.ctx, action, service, steps)
            result = "success"
        except RepairFailed as err:
            steps(f"failed: {err}")
        except asyncio.CancelledError:
            steps("cancelled: the receiver is shutting down")
            raise
        except Exception as err:
            log.exception("%s of %s crashed", action, service)
            steps(f"failed: internal error {type(err).__name__}: {err}")
        finally:
            self.metrics.in_progress.dec()
        finished = self.clock()
        self.metrics.remediations.labels(action, service, result).inc()
        self.metrics.duration.labels(action).observe(finished - started)
        await self.db(self.store.update, entry_id, state="done", result=result, finished_at=finished,
                      steps=steps.steps)
        log.log(logging.INFO if result == "success" else logging.ERROR, "%s of %s: %s in %.1fs (audit #%d)",
                action, service, result, finished - started, entry_id)

    async def history(self, limit: int, service_name: str | None) -> list[AuditEntry]:
        return await self.db(self.store.list, limit, service_name)
