"""The executor: from alerts to problems, and from problems to repairs, safely.

The receiver reconciles, level-triggered (DESIGN.md, "the repair model"): an alert
is not an order to act once but says "this service has a problem".

- **Problems.** Each alert is admitted once per ``(fingerprint, startsAt, status)``
  (the audit row, before the webhook answers). A firing alert that asks for a repair
  the service allows opens a problem, persisted; resends refresh it; a resolved
  notification closes it; one not refreshed for ``receiver.problem_ttl`` expires.
- **One worker per service** works on its open problems, so a service never has two
  repairs at once; at most ``receiver.workers`` services are looked at or repaired at
  once overall (the slot is taken before the look). Before
  every action it checks, in order: paused (``paused``); a dependency unhealthy now
  (``dependency_unhealthy``: the dependency goes first, nothing is spent); the
  problem's condition, observed now (``condition_cleared``: nothing is stopped); what
  the observation says can help (``escalated``: a probe failing for auth or tls is not
  fixed by a restart); the schedule (``cooldown`` for that repair, ``backoff``); the budget
  (``budget_exhausted``). Several problems are taken in an order that can succeed
  (files and paths before a restart).
- **Keep trying.** After an attempt, the next one is due ``receiver.cooldown`` after
  its end, while the problem is open and its condition holds. At most
  ``receiver.attempts.max`` attempts within ``attempts.window``; past that the service
  is *exhausted*: ERROR log, ``caretaker_remediation_attempts_exhausted`` 1, the alert
  ``CaretakerRepairsExhausted`` posted to Alertmanager (with ``alertmanager_url``), and
  attempts go on with capped exponential backoff (``receiver.backoff``). An operator
  reset, or ``attempts.healthy_for`` seconds of health, ends it; a reset makes the
  next attempt due at once. All of this is in the store and survives a restart.
- **Audit.** Every decision that changes is one audit entry with what was observed;
  the steps of a repair are written as it goes. A repair cut short by a receiver
  crash is marked ``interrupted``; its problem is still open, so it is observed and
  repaired again after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
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

from exporter.config import HOST_LABEL, Config

from .actions import KILL_WAIT_SECONDS, ActionContext, RepairFailed, StepLog
from .alertmanager import expire_silence, host_matcher, post_alert, silence
from .catalogue import run_action
from .family import boot_id
from .observe import observe
from .payload import SKIP_REASONS, Alert, Decision, decide
from .repairs import exec_argv
from .shared import SharedState, SharedStateError
from .store import AuditEntry, NewAlert, Problem, ServiceState, Store

__all__ = ["Admission", "Executor", "QueueFull", "ReceiverMetrics"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PENDING = 1000
MAX_RECHECK_SECONDS = 30.0
LOOK_INTERVAL = 0.05
"""Shortest time between two looks at one service (seconds)."""
MAX_LOOK_INTERVAL = 1.0
"""Longest, while notifications keep waking a worker whose looks change nothing."""
MAX_PROBLEMS_PER_LOOK = 500
"""Open problems of one service read per look, oldest first (a flood of distinct
alerts must not make each look read them all)."""
ACTION_ORDER = ("ensure_paths", "restore_file", "clean", "rotate_logs", "free_port", "stop_duplicates", "restart",
                "signal", "vacuum", "http", "exec", "release_claims")
"""Several open problems of one service are worked on in this order of their first step:
what the service needs to start (paths, a valid state file, disk space, its port) first,
then the service itself, then what acts on a running service."""
_AGGREGATED = frozenset({"no_service_name", "unknown_service", "unknown_action", "action_not_allowed", "other_host",
                         "no_host"})
"""Alerts the receiver will never act on, whatever the world: recorded as one audit row
per reason and hour (with a count), not one row each."""
_OBSERVED_LABELS = ("probe", "path", "heartbeat", "port")
"""Alert labels that change what :func:`~receiver.observe.observe` looks at."""
_ABOUT_THE_PROBLEM = frozenset({"escalated", "invalid_label", "cooldown"})
"""Reasons not to act that concern one problem only (a cooldown is the spacing of one
repair's attempts); the others (paused, a dependency, backoff, the budget) hold for
every problem of the service."""
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
                               "1 while the service's attempt budget is spent and repairs back off.",
                               ["service_name"], registry=registry)
        self.paused = Gauge("caretaker_service_paused", "1 while an operator has paused the service's repairs.",
                            ["service_name"], registry=registry)
        self.problems = Gauge("caretaker_problems_open", "Open problems of the service (firing repair alerts).",
                              ["service_name"], registry=registry)
        self.next_attempt = Gauge("caretaker_repair_next_attempt_timestamp_seconds",
                                  "When the next repair attempt of the service may start (0: at once).",
                                  ["service_name"], registry=registry)
        for name, svc in config.services.items():
            self.exhausted.labels(name)
            self.paused.labels(name)
            self.problems.labels(name)
            self.next_attempt.labels(name)
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


@dataclass(frozen=True)
class Assessment:
    """What the worker would do about one problem now, and what it saw."""

    reason: str
    """"" to act now, else why not (one of :data:`SKIP_REASONS`)."""
    observation: dict[str, Any] | None
    wait: float = 0.0
    """Seconds until it is worth looking again."""
    state: ServiceState | None = None
    """The service's state as read for this assessment (to act on it, when ``reason`` is "")."""


def problem_key(alertname: str, action: str, tried: bool, labels: Mapping[str, str],
                exec_labels: tuple[str, ...]) -> tuple[Any, ...]:
    """What makes two problems of a service the same to look at: their alert, repair,
    whether it was tried, and the labels that change what is observed or run."""
    return (alertname, action, tried, *(labels.get(k) for k in (*_OBSERVED_LABELS, *exec_labels)))


def _order(problem: Problem) -> tuple[int, int]:
    first = problem.action.split(",")[0]
    return (ACTION_ORDER.index(first) if first in ACTION_ORDER else len(ACTION_ORDER), problem.id)


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
        self._slots = asyncio.Semaphore(config.receiver.workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {name: asyncio.Event() for name in config.services}
        self._recheck: dict[str, float] = {}
        self._stopped = False
        self._seen_kinds: dict[str, set[tuple[Any, ...]]] = {}
        """Per service, the kinds of problem its worker's last look saw (see problem_key)."""
        self._urgent: set[str] = set()
        """Services with a new kind of problem: their next look is not held back."""
        self._changes = 0
        """Decisions written and attempts made, in all: a look that changes it is not idle."""
        self._busy: set[str] = set()
        """Services whose worker is looking or acting now (not waiting)."""
        self._waiting: list[tuple[list[NewAlert], asyncio.Future[list[int | None]]]] = []
        self.exhausted: dict[str, datetime] = {}
        """Services whose budget is spent, and since when."""
        self._healthy_since: dict[str, float] = {}
        self.dependents: dict[str, list[str]] = {name: [] for name in config.services}
        for name, cfg in config.services.items():
            for dep in cfg.depends_on:
                self.dependents[dep].append(name)

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
        """Mark what a previous run left half-done, restore which budgets are spent and
        which services are paused, and go back to work on the problems still open."""
        if self.store.reserve_bytes and not await self.db(self.store.hold_reserve):
            log.warning("not enough free disk beside %s to hold its %d-byte reserve; trying again later",
                        self.store.path, self.store.reserve_bytes)
        for entry in self.store.mark_interrupted(self.clock()):
            if entry.state == "interrupted":
                log.error("repair #%d (%s of %s) was interrupted by a receiver restart; its problem is worked on "
                          "again if it is still open", entry.id, entry.action, entry.service_name)
                if entry.service_name in self.config.services:
                    self.metrics.remediations.labels(entry.action, entry.service_name, "failure").inc()
        try:
            await self.prune()
        except sqlite3.Error as err:
            log.error("pruning the audit trail at start: %s", err)
        boot = boot_id()
        for name in self.config.services:
            state = await self.db(self.store.service_state, name)
            if state.family and self.ctx.family is not None and state.family_boot == boot:
                # Known before any worker looks: a repair resumed now stops the leftovers too.
                self.ctx.family.families.setdefault(name, frozenset(state.family))
            if state.exhausted_since is not None:
                self.exhausted[name] = datetime.fromtimestamp(state.exhausted_since, UTC)
                self.metrics.exhausted.labels(name).set(1)
            self.metrics.paused.labels(name).set(1 if state.paused_at(self.clock()) else 0)
            self.metrics.next_attempt.labels(name).set(state.next_attempt_at)
        for problem in await self.db(self.store.open_problems):
            if problem.service_name in self.config.services:
                self.wake(problem.service_name)

    async def stop(self) -> None:
        """Cancel repairs in flight (they will be marked interrupted on the next start)."""
        self._stopped = True
        for task in [*self._tasks, *self._workers.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._workers.values(), return_exceptions=True)
        self._db_thread.shutdown(wait=True)

    @property
    def pending(self) -> int:
        """Workers with something to do now (a repair running, or a problem about to be
        looked at); a worker that only waits for its next look does not count."""
        return len(self._tasks) + sum(1 for name in self._workers if self._wake[name].is_set()
                                      or name in self._busy)

    def wake(self, service: str) -> None:
        """Have the service's worker look at its problems now (starting it if needed)."""
        if self._stopped:
            return
        self._recheck.pop(service, None)
        self._wake[service].set()
        worker = self._workers.get(service)
        if worker is None or worker.done():
            self._workers[service] = asyncio.create_task(self._work(service), name=f"caretaker-{service}")

    # --- admission ----------------------------------------------------------------------------
    async def admit(self, alerts: Sequence[Alert]) -> Admission:
        """Dedupe, decide and record every alert; open, refresh or close problems and wake
        their services' workers. Raises ``QueueFull``."""
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
        hour = ""
        rows = []
        for a, d in zip(alerts, decisions, strict=True):
            if d.reason in _AGGREGATED:
                # One row per reason, status and hour, however many such alerts come (a
                # fuzzer, a misrouted Alertmanager): times_seen counts them. "~" is not a
                # fingerprint character, so these never meet a real alert's row.
                hour = hour or time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(self.clock()))
                rows.append(NewAlert(f"~{d.reason}", hour, a.status, a.alertname[:200], d.service_name, d.action,
                                     "skipped", d.reason))
            else:
                # An alert another receiver owns (shared state) still refreshes this
                # receiver's problem for it, if it has one: its labels go along.
                rows.append(NewAlert(a.fingerprint, a.starts_at_key, a.status, a.alertname[:200], d.service_name,
                                     d.action, _RECORDED_AS.get(d.reason, "skipped"), d.reason,
                                     json.dumps(a.labels) if d.acts or d.reason == "duplicate" else ""))
        ids = await self._admit_rows(rows)
        duplicates = queued = 0
        metrics = self.metrics
        for alert, decision, entry_id in zip(alerts, decisions, ids, strict=True):
            metrics.received[alert.status] += 1
            if decision.acts or (decision.reason == "resolved" and decision.service_name):
                if decision.acts and entry_id is not None and self._new_kind(decision, alert):
                    self._urgent.add(decision.service_name)
                self.wake(decision.service_name)
            if decision.reason in _AGGREGATED:
                metrics.skip(decision.service_name, decision.reason)
            elif entry_id is None:
                duplicates += 1
                metrics.skip(decision.service_name, "duplicate")
            elif decision.reason:
                metrics.skip(decision.service_name, decision.reason)
                if decision.reason not in _RECORDED_AS:
                    log.info("alert %s (%s): not acting: %s", alert.alertname, alert.fingerprint, decision.reason)
            else:
                queued += 1
        skipped = len(alerts) - duplicates - queued
        return Admission(len(alerts), duplicates, queued, skipped)

    def _new_kind(self, decision: Decision, alert: Alert) -> bool:
        """Whether ``alert`` is of a kind its service's worker did not see in its last look."""
        spec = self.config.services[decision.service_name].remediation.exec
        key = problem_key(alert.alertname, decision.action, False, alert.labels,
                          tuple(spec.labels) if spec is not None else ())
        return key not in self._seen_kinds.get(decision.service_name, ())

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

    # --- the worker: one per service with open problems ----------------------------------------
    async def _work(self, service: str) -> None:
        wake = self._wake[service]
        last_look = 0.0
        gap = LOOK_INTERVAL
        try:
            while True:
                # Alerts that arrive together are looked at together: a look (a /proc
                # scan, probes) starts at most every `gap` seconds, not once per
                # notification. After a look that changed nothing (a flood of alerts
                # about what is already decided) the gap doubles, up to
                # MAX_LOOK_INTERVAL; a look that acts or decides anew resets it.
                since = time.monotonic() - last_look
                if service in self._urgent:
                    self._urgent.discard(service)
                    gap = LOOK_INTERVAL
                if since < gap:
                    await asyncio.sleep(gap - since)
                last_look = time.monotonic()
                changes = self._changes
                wake.clear()
                self._busy.add(service)
                problems = await self._open_problems(service)
                if not problems:
                    if wake.is_set():  # a problem was opened while we looked
                        continue
                    return
                wait = await self._reconcile(service, problems)
                gap = LOOK_INTERVAL if self._changes != changes else min(MAX_LOOK_INTERVAL, gap * 2)
                # Look again by the time the first unrefreshed problem would expire.
                expiry = min(p.last_seen for p in problems) + self.config.receiver.problem_ttl - self.clock()
                wait = max(0.0, min(wait, expiry + 0.01))
                self._busy.discard(service)
                if wait > 0 and not wake.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not end the care of a service silently
            log.exception("the worker of %s failed; it starts again in %gs", service, MAX_RECHECK_SECONDS)
            self._spawn(self._restart_worker(service, MAX_RECHECK_SECONDS))
        finally:
            self._busy.discard(service)
            if self._workers.get(service) is asyncio.current_task():
                del self._workers[service]

    async def _restart_worker(self, service: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self.wake(service)

    async def _open_problems(self, service: str) -> list[Problem]:
        """The service's open problems, oldest first; expires those not refreshed."""
        now = self.clock()
        ttl = self.config.receiver.problem_ttl
        problems = []
        for problem in await self.db(self.store.problems, service, True, MAX_PROBLEMS_PER_LOOK):
            if now - problem.last_seen > ttl:
                log.warning("problem #%d of %s (%s) expired: no notification for %.0fs", problem.id, service,
                            problem.alertname, now - problem.last_seen)
                self.store.close_problem(problem.id, "expired", now)
                continue
            problems.append(problem)
        self.metrics.problems.labels(service).set(len(problems))
        return problems

    def _next_look(self, service: str) -> float:
        """Seconds to the next look at a waiting problem: doubles while nothing changes."""
        wait = self._recheck.get(service, self.config.receiver.recheck_interval)
        self._recheck[service] = min(MAX_RECHECK_SECONDS, wait * 2)
        return wait

    async def _reconcile(self, service: str, problems: list[Problem]) -> float:
        """One look at the service: act on the first problem that needs it, or record why
        not. Returns the seconds to wait before the next look (0: at once).

        The worker slot (and, with shared state, the service's Redis lock) is taken
        before the service is looked at, so what is acted on is what was seen: a service
        that recovered while its repair waited for a slot is not restarted."""
        async with self._slots:
            token = None
            if self.shared is not None:
                first = min(problems, key=_order)
                try:
                    token = await self.shared.acquire(service, self.repair_deadline(service) + 30.0)
                except SharedStateError as err:
                    log.error("shared state (Redis) unavailable, not repairing %s: %s", service, err)
                    self._record(first, "skipped", "shared_state_error", None)
                    return self._next_look(service)
                if token is None:  # another receiver repairs it now; it looks again after
                    self._record(first, "skipped", "in_progress", None)
                    return self.config.receiver.recheck_interval
            try:
                return await self._look(service, problems)
            finally:
                if token is not None and self.shared is not None:
                    try:
                        await self.shared.release(service, token)
                    except SharedStateError as err:
                        log.error("could not release the repair lock of %s (it expires by itself): %s",
                                  service, err)

    async def _look(self, service: str, problems: list[Problem]) -> float:
        waits = []
        seen: dict[tuple[Any, ...], Assessment] = {}
        exec_spec = self.config.services[service].remediation.exec
        exec_labels = tuple(exec_spec.labels) if exec_spec is not None else ()
        for problem in sorted(problems, key=_order):
            # Problems about the same thing share one look (a flood of alerts for one
            # service costs one observation per kind, not one per alert).
            key = problem_key(problem.alertname, problem.action, problem.attempts > 0, problem.labels, exec_labels)
            if key not in seen:
                seen[key] = await self.assess(service, problem.alertname, problem.labels, problem.action,
                                              problem.attempts)
            assessment = seen[key]
            if assessment.reason == "condition_cleared":
                if problem.attempts == 0:  # a stale alert: say so, once; after a repair it is expected
                    self._record(problem, "skipped", "condition_cleared", assessment.observation)
                waits.append(assessment.wait)
                continue
            if assessment.reason in _ABOUT_THE_PROBLEM:  # the service's other problems may still be worked on
                self._record(problem, "skipped", assessment.reason, assessment.observation)
                waits.append(assessment.wait)
                continue
            self._seen_kinds[service] = set(seen)
            if assessment.reason == "budget_exhausted":
                return await self._enter_backoff(service, problem, assessment.observation)
            if assessment.reason:
                self._record(problem, "skipped", assessment.reason, assessment.observation)
                return assessment.wait
            self._seen_kinds[service] = set(seen)
            assert assessment.state is not None
            await self._attempt(service, problem, assessment.observation, assessment.state)
            return 0.0
        self._seen_kinds[service] = set(seen)
        return min(waits, default=self._next_look(service))

    def _record(self, problem: Problem, decision: str, reason: str, observation: Any) -> None:
        """A decision not to act, written once while it stays the same."""
        if problem.last_decision == reason or (problem.last_decision, reason) == ("budget_exhausted", "backoff"):
            return
        self._changes += 1
        self.metrics.skip(problem.service_name, reason)
        log.info("%s of %s (problem #%d, %s): not now: %s", problem.action, problem.service_name, problem.id,
                 problem.alertname, reason)
        self.store.record(problem, self.clock(), decision, reason, observation)

    async def assess(self, service: str, alertname: str, labels: Mapping[str, str], action: str,
                     attempts: int) -> Assessment:
        """Whether a repair of ``service`` for this alert may run now, and what was seen.
        Observes the service (and its dependencies); changes nothing."""
        now = self.clock()
        cfg = self.config.services[service]
        state = await self.db(self.store.service_state, service)
        if state.paused_at(now):
            until = state.paused_until
            return Assessment("paused", {"paused_until": until, "reason": state.paused_reason},
                              min(MAX_RECHECK_SECONDS, until - now) if until else MAX_RECHECK_SECONDS)
        for dep in cfg.depends_on:
            seen = await observe(self.ctx, dep)
            if not seen.healthy:
                return Assessment("dependency_unhealthy", {"dependency": dep, **seen.as_json()},
                                  self._next_look(service))
        seen = await observe(self.ctx, service, alertname, labels, self.clock)
        # A condition the receiver cannot observe: act once; again only if that repair is
        # a restart and the service is unhealthy (an exec or http call does not start it).
        holds = seen.holds if seen.holds is not None else (
            attempts == 0 or (not seen.healthy and "restart" in action.split(",")))
        observation = seen.as_json()
        if not holds:
            return Assessment("condition_cleared", observation, self._next_look(service))
        if seen.escalate and any(step in ("restart", "signal") for step in action.split(",")):
            log.error("%s: %s; a restart cannot fix that: a person must look", service, seen.condition)
            return Assessment("escalated", observation, MAX_RECHECK_SECONDS)
        if "exec" in action.split(",") and cfg.remediation.exec is not None:
            try:
                exec_argv(cfg.remediation.exec.argv, dict(cfg.remediation.exec.labels), dict(labels))
            except RepairFailed as err:
                return Assessment("invalid_label", {**observation, "error": str(err)}, MAX_RECHECK_SECONDS)
        try:
            wait = await self._schedule(service, state, now, action)
        except SharedStateError as err:
            log.error("shared state (Redis) unavailable, not repairing %s: %s", service, err)
            return Assessment("shared_state_error", observation, self._next_look(service))
        if wait:
            reason = "backoff" if state.exhausted_since is not None else "cooldown"
            return Assessment(reason, {**observation, "next_attempt_at": now + wait}, wait)
        if state.exhausted_since is None and await self._budget_spent(service, now):
            return Assessment("budget_exhausted", observation, 0.0)
        if self.dry_run:
            return Assessment("dry_run", observation, MAX_RECHECK_SECONDS)
        return Assessment("", observation, state=state)

    async def _schedule(self, service: str, state: ServiceState, now: float, action: str) -> float:
        """Seconds until the next attempt of ``service`` with ``action`` is due (0: now).

        The cooldown spaces out repeats of a repair; after a successful one, a different
        repair (the restart after a restored file) is not held back by it. Backoff
        holds back every repair of an exhausted service."""
        if state.exhausted_since is None and state.last_result == "success" and state.last_action != action:
            return 0.0
        due = state.next_attempt_at
        if self.shared is not None and state.exhausted_since is None:
            last = await self.shared.last_finished(service)
            if last is not None:
                due = max(due, last + self.config.receiver.cooldown)
        # Capped: a time written while the clock was ahead (no RTC, before NTP) must not
        # hold repairs back until real time catches up.
        recv = self.config.receiver
        return max(0.0, min(due - now, max(recv.backoff.max, recv.cooldown)))

    async def _budget_spent(self, service: str, now: float) -> bool:
        attempts = self.config.receiver.attempts
        since = now - attempts.window
        if self.shared is not None:
            return await self.shared.repairs_since(service, since) >= attempts.max
        return await self.db(self.store.repairs_since, service, since) >= attempts.max

    # --- an attempt ------------------------------------------------------------------------------
    async def _attempt(self, service: str, problem: Problem, observation: Any, state: ServiceState) -> None:
        """Run the problem's repair once (``assess`` allowed it, under the slot), then schedule the next."""
        self._changes += 1
        result = await self._run(service, problem, observation)
        finished = self.clock()
        last = {"last_action": problem.action, "last_result": result}
        if state.exhausted_since is not None:
            backoff = self.config.receiver.backoff
            delay = min(backoff.max, backoff.initial * 2 ** max(0, state.backoff_step))
            self._set_next(service, finished + delay, backoff_step=state.backoff_step + 1, **last)
        else:
            self._set_next(service, finished + self.config.receiver.cooldown, **last)
        if result == "success":
            for dependent in self.dependents[service]:
                if self._workers.get(dependent) is not None:
                    self.wake(dependent)

    async def _enter_backoff(self, service: str, problem: Problem, observation: Any) -> float:
        """The budget is spent: say so loudly, and space the next attempts out."""
        await self._exhaust(service)
        self._record(problem, "skipped", "budget_exhausted", observation)
        delay = self.config.receiver.backoff.initial
        self._set_next(service, self.clock() + delay, backoff_step=1)
        return delay

    def _set_next(self, service: str, at: float, **fields: Any) -> None:
        self.store.set_service_state(service, next_attempt_at=at, **fields)
        self.metrics.next_attempt.labels(service).set(at)

    async def _run(self, service: str, problem: Problem, observation: Any) -> str:
        action = problem.action
        started = self.clock()
        entry_id = self.store.record(problem, started, "acted", "", observation, state="running", attempt=True)
        self.store.update(entry_id, started_at=started)
        if self.shared is not None:
            try:
                await self.shared.record_start(service, started)
            except SharedStateError as err:
                log.error("could not record the start of the repair of %s in Redis: %s", service, err)

        def persist(current: list[dict[str, Any]]) -> None:
            # Written as the repair goes, so a crash mid-repair leaves its trace.
            try:
                self.store.update(entry_id, steps=current)
            except sqlite3.Error as err:
                log.error("could not write the steps of repair #%d to the store: %s", entry_id, err)

        steps = StepLog(on_step=persist)
        ctx = dataclasses.replace(self.ctx, labels=dict(problem.labels))
        log.info("%s of %s: starting (problem #%d, attempt %d, audit #%d)", action, service, problem.id,
                 problem.attempts + 1, entry_id)
        self.metrics.in_progress.inc()
        result = "failure"
        silence_id = await self._silence(service, action, steps)
        deadline = self.repair_deadline(service)
        try:
            async with asyncio.timeout(deadline):
                for step in action.split(","):  # several steps from a rule: in order, stop at the first failure
                    if "," in action:
                        steps(f"step {step}")
                    await run_action(ctx, step, service, steps)
            result = "success"
        except TimeoutError:
            log.error("%s of %s timed out after %.0fs (audit #%d)", action, service, deadline, entry_id)
            steps(f"failed: timed out after {deadline:g}s (remediation.timeout); the next attempt is scheduled")
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
        return result

    def repair_deadline(self, service: str) -> float:
        """Seconds one repair of ``service`` may take, every step included."""
        cfg = self.config.services[service]
        if cfg.remediation.timeout is not None:
            return cfg.remediation.timeout
        floor = 0.0
        if "restart" in cfg.remediation.allow and cfg.start is not None:
            floor = cfg.stop.grace_period * 2 + 2 * KILL_WAIT_SECONDS + cfg.start.timeout \
                + cfg.remediation.verify_timeout + 60.0
        return max(self.config.receiver.repair_timeout, floor)

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
                                   f"caretaker is repairing {service} ({action})", host_matcher(recv.host, recv.fleet))
        steps(f"silenced alerts of {service} in Alertmanager ({silence_id})" if silence_id
              else "could not silence the service's alerts; repairing anyway")
        return silence_id

    # --- exhausted budgets ----------------------------------------------------------------------
    async def _exhaust(self, service: str) -> None:
        if service not in self.exhausted:
            attempts = self.config.receiver.attempts
            backoff = self.config.receiver.backoff
            log.error("REPAIRS EXHAUSTED for %s: %d repairs within %.0fs; trying again with backoff (%.0fs doubling "
                      "to %.0fs) until it has been healthy for %.0fs or an operator resets it "
                      "(POST /api/v1/services/%s/reset). A person should look at it.", service, attempts.max,
                      attempts.window, backoff.initial, backoff.max, attempts.healthy_for, service)
            now = datetime.now(UTC)
            self.exhausted[service] = now
            self.store.set_service_state(service, exhausted_since=now.timestamp())
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
             "source": "caretaker-receiver", HOST_LABEL: self.config.receiver.host},
            {"summary": f"caretaker's repairs of {service} keep failing",
             "description": f"{service} used its repair budget ({attempts.max} within {attempts.window:g}s). "
                            "caretaker keeps trying with exponential backoff until it has been healthy for "
                            f"{attempts.healthy_for:g}s or an operator resets it.",
             "runbook_url": "docs/runbook.md#caretakerrepairsexhausted"},
            self.exhausted[service], timedelta(seconds=3 * EXHAUSTED_REPOST_SECONDS) if firing else None)

    async def reset(self, service: str, reason: str) -> bool:
        """Re-enable repairs of ``service`` at once; True if its budget was spent."""
        was = service in self.exhausted
        now = self.clock()
        self.store.reset_budget(service, now, reason)
        self.store.set_service_state(service, exhausted_since=None, backoff_step=0, next_attempt_at=0.0)
        self.metrics.next_attempt.labels(service).set(0)
        if self.shared is not None:
            await self.shared.reset(service, now)
        if was:
            await self._post_exhausted(service, firing=False)
            del self.exhausted[service]
            log.warning("repairs of %s re-enabled: %s", service, reason)
        self._healthy_since.pop(service, None)
        self.metrics.exhausted.labels(service).set(0)
        self.wake(service)
        return was

    async def pause(self, service: str, duration: float | None, reason: str) -> float | None:
        """Leave ``service`` alone (for ``duration`` seconds, or until resumed); returns
        when the pause ends (Unix seconds), or None."""
        until = self.clock() + duration if duration else None
        self.store.set_service_state(service, paused=True, paused_until=until, paused_reason=reason[:200])
        self.metrics.paused.labels(service).set(1)
        log.warning("repairs of %s paused%s: %s", service,
                    f" for {duration:g}s" if duration else " until resumed", reason)
        self.wake(service)
        return until

    async def may_start(self, service: str) -> bool:
        """Whether ``service`` may be started now (not paused); for a repair in flight."""
        return not (await self.db(self.store.service_state, service)).paused_at(self.clock())

    async def resume(self, service: str) -> bool:
        """End a pause; True if the service was paused."""
        was = (await self.db(self.store.service_state, service)).paused_at(self.clock())
        self.store.set_service_state(service, paused=False, paused_until=None, paused_reason="")
        self.metrics.paused.labels(service).set(0)
        if was:
            log.warning("repairs of %s resumed", service)
        self.wake(service)
        return was

    async def watch_exhausted(self, interval: float = 5.0) -> None:
        """Keep the exhausted alerts firing; re-enable a service once healthy long enough.
        Also ends pauses whose time is up (for the metric)."""
        last_post = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                last_post = await self._watch_once(last_post)
            except Exception:  # this loop keeps CaretakerRepairsExhausted firing: it must not end
                log.exception("watching exhausted and paused services; trying again in %gs", interval)

    async def _watch_once(self, last_post: float) -> float:
        """One pass of :meth:`watch_exhausted`; returns when the exhausted alerts were last posted."""
        now = self.clock()
        for service in list(self.exhausted):
            if (await observe(self.ctx, service)).healthy:
                since = self._healthy_since.setdefault(service, now)
                if now - since >= self.config.receiver.attempts.healthy_for:
                    await self.reset(service, f"healthy for {now - since:.0f}s")
            else:
                self._healthy_since.pop(service, None)
        if self.exhausted and now - last_post >= EXHAUSTED_REPOST_SECONDS:
            last_post = now
            for service in list(self.exhausted):
                await self._post_exhausted(service, firing=True)
        for service in self.config.services:
            state = await self.db(self.store.service_state, service)
            self.metrics.paused.labels(service).set(1 if state.paused_at(now) else 0)
        return last_post

    # --- read-only ---------------------------------------------------------------------------------
    async def plan(self, alerts: Sequence[Alert]) -> list[dict[str, Any]]:
        """What the receiver would do about these alerts now, and why, with what it sees
        of each service; records nothing, changes nothing."""
        out = []
        for alert in alerts:
            d: Decision = decide(alert, self.config)
            item: dict[str, Any] = {"alertname": alert.alertname, "fingerprint": alert.fingerprint,
                                    "status": alert.status, "service_name": d.service_name, "action": d.action,
                                    "observation": None}
            if not d.acts:
                reason = d.reason
            else:
                assessment = await self.assess(d.service_name, alert.alertname, alert.labels, d.action, 0)
                reason, item["observation"] = assessment.reason, assessment.observation
                if await self.db(self.store.seen, alert.fingerprint, alert.starts_at_key, alert.status):
                    item["problem"] = "open already (a resend refreshes it)"
            item["would"] = "skip" if reason else "repair"
            item["reason"] = reason
            out.append(item)
        return out

    async def problems(self, service_name: str | None = None, open_only: bool = False,
                       limit: int = 100) -> list[dict[str, Any]]:
        """Problems with their state and the next attempt time of their service."""
        problems = await self.db(self.store.problems, service_name, open_only, limit)
        states: dict[str, ServiceState] = {}
        out = []
        now = self.clock()
        for problem in problems:
            if problem.service_name not in states:
                states[problem.service_name] = await self.db(self.store.service_state, problem.service_name)
            state = states[problem.service_name]
            item = problem.as_json()
            if problem.state == "open":
                item["next_attempt_at"] = max(now, state.next_attempt_at)
                item["paused"] = state.paused_at(now)
                item["exhausted"] = state.exhausted_since is not None
            out.append(item)
        return out

    async def history(self, limit: int, service_name: str | None) -> list[AuditEntry]:
        return await self.db(self.store.list, limit, service_name)

    async def track_forever(self) -> None:
        """Keep each service's process family (:class:`~receiver.family.FamilyTracker`)
        current, and persisted so that a restarted receiver still knows the leftovers."""
        family = self.ctx.family
        if family is None:
            return
        boot = boot_id()
        while True:
            try:
                changed = await asyncio.to_thread(family.scan)
            except OSError as err:
                log.warning("scanning the services' processes: %s", err)
                changed = {}
            for name, members in changed.items():
                try:
                    self.store.set_service_state(name, family=sorted(members), family_boot=boot)
                except sqlite3.Error as err:
                    log.error("could not record the processes of %s: %s", name, err)
            await asyncio.sleep(self.config.receiver.track_interval)

    async def prune(self) -> int:
        """Apply ``receiver.audit_retention`` (off the loop, in short transactions)."""
        recv = self.config.receiver
        now = self.clock()
        deleted = await self.db(self.store.prune, now, recv.audit_retention.max_age,
                                recv.audit_retention.max_entries, now - recv.attempts.window)
        if deleted:
            log.info("audit trail: %d old entries pruned (receiver.audit_retention)", deleted)
        return deleted

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
                    await self.prune()
            except (sqlite3.Error, OSError) as err:
                log.error("maintenance of the state file: %s", err)
