"""The executor: from a validated notification to repairs, safely.

- **Dedupe.** Each alert is admitted once per ``(fingerprint, startsAt, status)``, in
  SQLite, before the webhook answers; resends and retries are counted, not re-run.
- **One repair at a time per service** (a lock per service) and at most
  ``receiver.workers`` repairs at once overall (a semaphore).
- **Cooldown.** No repair of a service starts within ``receiver.cooldown`` seconds of
  the end of the previous one.
- **Attempt budget.** At most ``receiver.attempts.max`` repairs of a service within
  ``receiver.attempts.window`` seconds. Past that: no more repairs, an ERROR log,
  ``caretaker_remediation_attempts_exhausted{service_name}`` 1, and (when
  ``receiver.alertmanager_url`` is set) the alert ``CaretakerRepairsExhausted`` posted
  to Alertmanager and kept firing. Repairs resume when the service has been healthy for
  ``attempts.healthy_for`` seconds, or when an operator resets the budget.
- **Audit.** Every decision is a row in the audit trail; the steps of a repair are
  written as it goes. A repair cut short by a receiver crash is marked ``interrupted``
  at the next start, not repeated, and its service is verified again.

Cooldown, budget and resets are read from the store, so they survive a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from exporter.config import Config

from .actions import ActionContext, RepairFailed, StepLog, verify
from .alertmanager import expire_silence, post_alert, silence
from .catalogue import run_action
from .payload import SKIP_REASONS, Alert, Decision, decide
from .shared import SharedState, SharedStateError
from .store import AuditEntry, NewAlert, Store

__all__ = ["Admission", "Executor", "QueueFull", "ReceiverMetrics"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PENDING = 1000
_RECORDED_AS = {"": "queued", "resolved": "recorded", "no_remediation": "recorded"}
"""The audit decision of a new alert by its decision's reason; any other reason is "skipped"."""
EXHAUSTED_REPOST_SECONDS = 60.0
EXHAUSTED_ALERT = "CaretakerRepairsExhausted"


class ReceiverMetrics:
    """The receiver's own metrics, on the app's registry; label sets pre-initialised.

    The three counters bumped on every webhook request (alerts received, alerts
    skipped, requests by code) are plain ints exposed by :meth:`collect` at scrape
    time: prometheus_client's ``Counter.inc`` takes a lock and checks its state on each
    call, about 3 us, a tenth of a notification's CPU time. Only the event loop's
    thread touches them, scrapes included.
    """

    def __init__(self, registry: CollectorRegistry, config: Config) -> None:
        self.received = {"firing": 0, "resolved": 0}
        self.skipped = {(name, reason): 0 for name in config.services for reason in SKIP_REASONS}
        self.requests: dict[int, int] = {}
        registry.register(self)
        self.remediations = Counter("caretaker_remediations", "Repairs run, by result.",
                                    ["action", "service_name", "result"], registry=registry)
        self.duration = Histogram("caretaker_remediation_duration_seconds",
                                  "Time from the start of a repair to its verified end.", ["action"],
                                  buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=registry)
        self.in_progress = Gauge("caretaker_remediations_in_progress", "Repairs running now.", registry=registry)
        self.exhausted = Gauge("caretaker_remediation_attempts_exhausted",
                               "1 while the service's attempt budget is spent and repairs are refused.",
                               ["service_name"], registry=registry)
        for name, svc in config.services.items():
            self.exhausted.labels(name)
            for action in svc.remediation.allow:
                self.duration.labels(action)
                for result in ("success", "failure"):
                    self.remediations.labels(action, name, result)

    def skip(self, service: str, reason: str) -> None:
        """Count an alert not acted on (``service`` "" when unknown: bounded cardinality)."""
        key = (service, reason)
        self.skipped[key] = self.skipped.get(key, 0) + 1

    def request_count(self, code: int) -> None:
        """Count one webhook answer."""
        self.requests[code] = self.requests.get(code, 0) + 1

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily("caretaker_alerts_received", "Alerts received in webhook notifications.",
                                       labels=["status"])
        for status, n in self.received.items():
            received.add_metric([status], n)
        skipped = CounterMetricFamily("caretaker_alerts_skipped",
                                      "Alerts not acted on, by reason (service_name empty when unknown).",
                                      labels=["service_name", "reason"])
        for (service, reason), n in self.skipped.items():
            skipped.add_metric([service, reason], n)
        requests = CounterMetricFamily("caretaker_webhook_requests", "Webhook requests, by HTTP status code.",
                                       labels=["code"])
        for code, n in sorted(self.requests.items()):
            requests.add_metric([str(code)], n)
        yield from (received, skipped, requests)


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


class Executor:
    def __init__(self, config: Config, store: Store, ctx: ActionContext, metrics: ReceiverMetrics,
                 clock: Callable[[], float] = time.time, dry_run: bool = False,
                 shared: SharedState | None = None) -> None:
        self.config = config
        self.shared = shared
        self.store = store
        self.ctx = ctx
        self.metrics = metrics
        self.clock = clock
        self.dry_run = dry_run
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caretaker-store")
        self._locks: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in config.services}
        self._slots = asyncio.Semaphore(config.receiver.workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: list[tuple[list[NewAlert], asyncio.Future[list[int | None]]]] = []
        self.exhausted: dict[str, datetime] = {}
        """Services whose budget is spent, and since when."""
        self._healthy_since: dict[str, float] = {}

    async def db(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call (a read, or the checkpoint) on the store's own thread.
        Writes are made on the loop: see :class:`Store`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, lambda: func(*args, **kwargs))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Mark what a previous run left half-done, verify those services again, and
        restore which budgets are spent."""
        if self.store.reserve_bytes and not await self.db(self.store.hold_reserve):
            log.warning("not enough free disk beside %s to hold its %d-byte reserve; trying again later",
                        self.store.path, self.store.reserve_bytes)
        for entry in self.store.mark_interrupted(self.clock()):
            if entry.state == "interrupted":
                log.error("repair #%d (%s of %s) was interrupted by a receiver restart; not repeating it, "
                          "verifying the service again", entry.id, entry.action, entry.service_name)
                self.metrics.remediations.labels(entry.action, entry.service_name, "failure").inc()
                if entry.service_name in self.config.services:
                    self._spawn(self._reverify(entry))
        now = self.clock()
        for name in self.config.services:
            try:
                spent = await self._budget_spent(name, now)
            except SharedStateError as err:
                log.warning("shared state (Redis) unavailable at start: budget of %s unknown until it is: %s",
                            name, err)
                continue
            if spent:
                self.exhausted[name] = datetime.now(UTC)
                self.metrics.exhausted.labels(name).set(1)

    async def _reverify(self, entry: AuditEntry) -> None:
        steps = StepLog(list(entry.steps))
        steps("receiver restarted during this repair: verifying the service again")
        cfg = self.config.services[entry.service_name]
        try:
            await verify(self.ctx, entry.service_name, cfg.remediation.verify_timeout, steps)
        except RepairFailed as err:
            steps(f"still not healthy: {err}; its alerts will ask for a repair again")
        self.store.update(entry.id, steps=steps.steps)

    async def stop(self) -> None:
        """Cancel repairs in flight (they will be marked interrupted on the next start)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._db_thread.shutdown(wait=True)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    # --- admission ----------------------------------------------------------------------------
    async def admit(self, alerts: Sequence[Alert]) -> Admission:
        """Dedupe, decide and record every alert; queue the repairs. Raises ``QueueFull``."""
        if self.pending >= MAX_PENDING:
            raise QueueFull(f"{self.pending} repairs pending")
        decisions = [decide(a, self.config) for a in alerts]
        if self.shared is not None:
            acting = [i for i, d in enumerate(decisions) if d.acts]
            # Raises SharedStateError (the webhook answers 503) before anything is recorded.
            claimed = await self.shared.claim([(alerts[i].fingerprint, alerts[i].starts_at_key, alerts[i].status)
                                               for i in acting])
            for i, mine in zip(acting, claimed, strict=True):
                if not mine:  # another receiver owns this alert
                    decisions[i] = decisions[i]._replace(reason="duplicate")
        rows = [NewAlert(a.fingerprint, a.starts_at_key, a.status, a.alertname[:200], d.service_name, d.action,
                         _RECORDED_AS.get(d.reason, "skipped"), d.reason)
                for a, d in zip(alerts, decisions, strict=True)]
        ids = await self._admit_rows(rows)
        duplicates = queued = 0
        metrics = self.metrics
        for alert, decision, entry_id in zip(alerts, decisions, ids, strict=True):
            metrics.received[alert.status] += 1
            if entry_id is None:
                duplicates += 1
                metrics.skip(decision.service_name, "duplicate")
            elif decision.reason:
                metrics.skip(decision.service_name, decision.reason)
                if decision.reason not in _RECORDED_AS:
                    log.info("alert %s (%s): not acting: %s", alert.alertname, alert.fingerprint, decision.reason)
            else:
                queued += 1
                self._spawn(self._repair(entry_id, decision.service_name, decision.action, alert.labels))
        skipped = len(alerts) - duplicates - queued
        return Admission(len(alerts), duplicates, queued, skipped)

    # Group commit: the notifications that arrive in one turn of the event loop are
    # written together in one transaction, on the loop itself (a commit without fsync
    # costs tens of microseconds; handing each one to a thread cost more than that in
    # wake-ups and GIL hand-offs, measured with bench/webhook.py). Each request still
    # answers only after its commit.
    async def _admit_rows(self, rows: list[NewAlert]) -> list[int | None]:
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

    async def _skip(self, entry_id: int, service: str, reason: str) -> None:
        self.metrics.skip(service, reason)
        self.store.update(entry_id, decision="skipped", reason=reason, state="done")

    async def _budget_spent(self, service: str, now: float) -> bool:
        attempts = self.config.receiver.attempts
        since = now - attempts.window
        if self.shared is not None:
            return await self.shared.repairs_since(service, since) >= attempts.max
        return await self.db(self.store.repairs_since, service, since) >= attempts.max

    async def _hold_back(self, service: str, now: float) -> str:
        """Why a repair of ``service`` may not start now ("" when it may)."""
        try:
            return await self._hold_back_reason(service, now)
        except SharedStateError as err:
            log.error("shared state (Redis) unavailable, not repairing %s: %s", service, err)
            return "shared_state_error"

    async def _hold_back_reason(self, service: str, now: float) -> str:
        recv = self.config.receiver
        if self.shared is not None:
            last = await self.shared.last_finished(service)
        else:
            last = await self.db(self.store.last_repair_finished, service)
        if last is not None and now - last < recv.cooldown:
            return "cooldown"
        if service in self.exhausted or await self._budget_spent(service, now):
            return "budget_exhausted"
        return "dry_run" if self.dry_run else ""

    async def _repair(self, entry_id: int, service: str, action: str, labels: Mapping[str, str]) -> None:
        async with self._locks[service], self._slots:
            token = None
            reason = ""
            if self.shared is not None:
                cfg = self.config.services[service]
                lease = cfg.stop.grace_period + cfg.remediation.verify_timeout + 120.0
                try:
                    token = await self.shared.acquire(service, lease)
                except SharedStateError as err:
                    log.error("shared state (Redis) unavailable, not repairing %s: %s", service, err)
                    reason = "shared_state_error"
                else:
                    reason = "" if token else "in_progress"  # another receiver repairs it now
            try:
                reason = reason or await self._hold_back(service, self.clock())
                if reason == "budget_exhausted":
                    await self._exhaust(service)
                if reason:
                    log.info("%s of %s skipped: %s", action, service, reason)
                    await self._skip(entry_id, service, reason)
                    return
                await self._run(entry_id, service, action, labels)
            finally:
                if token is not None and self.shared is not None:
                    try:
                        await self.shared.release(service, token)
                    except SharedStateError as err:
                        log.error("could not release the repair lock of %s (it expires by itself): %s",
                                  service, err)

    async def _run(self, entry_id: int, service: str, action: str, labels: Mapping[str, str]) -> None:
        started = self.clock()
        self.store.update(entry_id, decision="acted", state="running", started_at=started)
        if self.shared is not None:
            await self.shared.record_start(service, started)

        def persist(current: list[dict[str, Any]]) -> None:
            # Written as the repair goes, so a crash mid-repair leaves its trace.
            try:
                self.store.update(entry_id, steps=current)
            except sqlite3.Error as err:
                log.error("could not write the steps of repair #%d to the store: %s", entry_id, err)

        steps = StepLog(on_step=persist)
        ctx = dataclasses.replace(self.ctx, labels=dict(labels))
        log.info("%s of %s: starting (audit #%d)", action, service, entry_id)
        self.metrics.in_progress.inc()
        result = "failure"
        silence_id = await self._silence(service, action, steps)
        try:
            for step in action.split(","):  # several steps from a rule: in order, stop at the first failure
                if "," in action:
                    steps(f"step {step}")
                await run_action(ctx, step, service, steps)
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
            if silence_id is not None and self.config.receiver.alertmanager_url:
                expired = await expire_silence(self.ctx.session, self.config.receiver.alertmanager_url, silence_id)
                steps(f"silence {silence_id} {'expired' if expired else 'could not be expired (it ends by itself)'}")
        finished = self.clock()
        self.metrics.remediations.labels(action, service, result).inc()
        self.metrics.duration.labels(action).observe(finished - started)
        self.store.update(entry_id, state="done", result=result, finished_at=finished, steps=steps.steps)
        if self.shared is not None:
            try:
                await self.shared.record_finish(service, finished)
            except SharedStateError as err:
                log.error("could not record the end of the repair of %s in Redis: %s", service, err)
        log.log(logging.INFO if result == "success" else logging.ERROR, "%s of %s: %s in %.1fs (audit #%d)",
                action, service, result, finished - started, entry_id)

    async def _silence(self, service: str, action: str, steps: StepLog) -> str | None:
        """Silence the service's alerts while it is stopped and started, if configured."""
        recv = self.config.receiver
        if not (recv.silence_during_repair and recv.alertmanager_url):
            return None
        if not {"restart", "stop_duplicates", "free_port"} & set(action.split(",")):
            return None
        cfg = self.config.services[service]
        duration = timedelta(seconds=cfg.stop.grace_period + cfg.remediation.verify_timeout + 60)
        silence_id = await silence(self.ctx.session, recv.alertmanager_url, {"service_name": service}, duration,
                                   f"caretaker is repairing {service} ({action})")
        steps(f"silenced alerts of {service} in Alertmanager ({silence_id})" if silence_id
              else "could not silence the service's alerts; repairing anyway")
        return silence_id

    # --- exhausted budgets ----------------------------------------------------------------------
    async def _exhaust(self, service: str) -> None:
        if service not in self.exhausted:
            attempts = self.config.receiver.attempts
            log.error("REPAIRS EXHAUSTED for %s: %d repairs within %.0fs; not repairing it again until it has "
                      "been healthy for %.0fs or an operator resets it (POST /api/v1/services/%s/reset). "
                      "A person should look at it.", service, attempts.max, attempts.window, attempts.healthy_for,
                      service)
            self.exhausted[service] = datetime.now(UTC)
            await self._post_exhausted(service, firing=True)
        self.metrics.exhausted.labels(service).set(1)

    async def _post_exhausted(self, service: str, firing: bool) -> None:
        url = self.config.receiver.alertmanager_url
        if not url or service not in self.exhausted:
            return
        attempts = self.config.receiver.attempts
        await post_alert(
            self.ctx.session, url,
            {"alertname": EXHAUSTED_ALERT, "service_name": service, "severity": "critical",
             "source": "caretaker-receiver"},
            {"summary": f"caretaker gave up repairing {service}",
             "description": f"{service} used its repair budget ({attempts.max} within {attempts.window:g}s). "
                            "caretaker will not repair it again until it has been healthy for "
                            f"{attempts.healthy_for:g}s or an operator resets it.",
             "runbook_url": "docs/runbook.md#caretakerrepairsexhausted"},
            self.exhausted[service], timedelta(seconds=3 * EXHAUSTED_REPOST_SECONDS) if firing else None)

    async def reset(self, service: str, reason: str) -> bool:
        """Re-enable repairs of ``service``; True if its budget was spent."""
        was = service in self.exhausted
        self.store.reset_budget(service, self.clock(), reason)
        if self.shared is not None:
            await self.shared.reset(service, self.clock())
        if was:
            await self._post_exhausted(service, firing=False)
            del self.exhausted[service]
            log.warning("repairs of %s re-enabled: %s", service, reason)
        self._healthy_since.pop(service, None)
        self.metrics.exhausted.labels(service).set(0)
        return was

    async def watch_exhausted(self, interval: float = 5.0) -> None:
        """Keep the exhausted alerts firing; re-enable a service once healthy long enough."""
        last_post = 0.0
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            for service in list(self.exhausted):
                if await self._healthy(service):
                    since = self._healthy_since.setdefault(service, now)
                    if now - since >= self.config.receiver.attempts.healthy_for:
                        await self.reset(service, f"healthy for {now - since:.0f}s")
                else:
                    self._healthy_since.pop(service, None)
            if self.exhausted and now - last_post >= EXHAUSTED_REPOST_SECONDS:
                last_post = now
                for service in list(self.exhausted):
                    await self._post_exhausted(service, firing=True)

    async def _healthy(self, service: str) -> bool:
        """Processes within [min, max] and every probe passing, now."""
        try:
            await verify(self.ctx, service, 0.0, StepLog())
        except RepairFailed:
            return False
        return True

    # --- read-only ---------------------------------------------------------------------------------
    async def plan(self, alerts: Sequence[Alert]) -> list[dict[str, Any]]:
        """What :meth:`admit` would do with these alerts now, and why; records nothing."""
        out = []
        now = self.clock()
        for alert in alerts:
            d: Decision = decide(alert, self.config)
            item: dict[str, Any] = {"alertname": alert.alertname, "fingerprint": alert.fingerprint,
                                    "status": alert.status, "service_name": d.service_name, "action": d.action}
            if await self.db(self.store.seen, alert.fingerprint, alert.starts_at_key, alert.status):
                reason = "duplicate"
            elif not d.acts:
                reason = d.reason
            else:
                reason = await self._hold_back(d.service_name, now)
            item["would"] = "skip" if reason else "repair"
            item["reason"] = reason
            out.append(item)
        return out

    async def history(self, limit: int, service_name: str | None) -> list[AuditEntry]:
        return await self.db(self.store.list, limit, service_name)

    async def checkpoint_forever(self, interval: float = 1.0, reserve_every: int = 60) -> None:
        """Fold the store's WAL into the database file now and then, and make its disk
        reserve again once there is room (every ``reserve_every`` intervals), off the loop."""
        turns = 0
        while True:
            await asyncio.sleep(interval)
            turns += 1
            try:
                await self.db(self.store.checkpoint)
                if turns % reserve_every == 0:
                    await self.db(self.store.hold_reserve)
            except (sqlite3.Error, OSError) as err:
                log.error("maintenance of the state file: %s", err)
