"""The executor: from alerts to problems, and from problems to repairs, safely.

The receiver reconciles, level-triggered (docs/design.md, "The repair model"): an alert
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

The :class:`Executor` orchestrates; each of its parts does one job:
:mod:`~receiver.admission` (the audit rows of a notification, group commit),
:mod:`~receiver.budget` (cooldown, budget, backoff, exhaustion, resets),
:mod:`~receiver.runner` (running one repair), :mod:`~receiver.state` (what one
receiver keeps alone and an HA pair shares: claims, the repair lock, the budget's
count), :mod:`~receiver.metrics`, and :mod:`~receiver.vocabulary` (the words of the
audit trail).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from exporter.config import Config

from .actions import ActionContext, RepairFailed
from .admission import AGGREGATED, RECORDED_AS, Admission, GroupCommit, HostSkips, QueueFull, audit_rows
from .budget import EXHAUSTED_ALERT, EXHAUSTED_REPOST_SECONDS, Budget
from .family import boot_id
from .metrics import ReceiverMetrics
from .observe import observe
from .parts import Parts
from .payload import Alert, Decision, decide
from .repairs import exec_argv
from .runner import RepairRunner
from .shared import SharedStateError
from .state import RepairState
from .store import AuditEntry, Problem, ServiceState, Store
from .vocabulary import AuditDecision, EntryState, ProblemState, Reason, RepairResult

__all__ = ["EXHAUSTED_ALERT", "EXHAUSTED_REPOST_SECONDS", "Admission", "Executor", "QueueFull", "ReceiverMetrics"]

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
_OBSERVED_LABELS = ("probe", "path", "heartbeat", "port")
"""Alert labels that change what :func:`~receiver.observe.observe` looks at."""
_ABOUT_THE_PROBLEM = frozenset({Reason.ESCALATED, Reason.INVALID_LABEL, Reason.COOLDOWN})
"""Reasons not to act that concern one problem only (a cooldown is the spacing of one
repair's attempts); the others (paused, a dependency, backoff, the budget) hold for
every problem of the service."""
# Plain values, bound once: admit() compares them for every alert (see receiver.vocabulary).
_DUPLICATE, _RESOLVED = Reason.DUPLICATE.value, Reason.RESOLVED.value


@dataclass(frozen=True)
class Assessment:
    """What the worker would do about one problem now, and what it saw."""

    reason: str
    """"" to act now, else why not (a :class:`~receiver.vocabulary.Reason`)."""
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
    """The orchestrator: admits alerts, keeps one worker per service with open problems,
    and decides each look; the parts it drives do one job each.

    ``state`` is what differs between a lone receiver and an HA pair
    (:class:`~receiver.state.LocalState` or :class:`~receiver.shared.SharedState`,
    chosen where the app is wired). ``clock`` gives every time that is stored or
    compared with a stored one (Unix seconds): the schedule, the budget window,
    ``healthy_for``, problem expiry. The worker's own pacing (the gap between looks, the
    wait for the next one) runs on the event loop's clock; a test that moves ``clock``
    on calls :meth:`wake` to have the worker look again at once.
    """

    def __init__(self, config: Config, store: Store, state: RepairState, ctx: ActionContext,
                 metrics: ReceiverMetrics, clock: Callable[[], float] = time.time, dry_run: bool = False) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.ctx = ctx
        self.metrics = metrics
        self.clock = clock
        self.dry_run = dry_run
        parts = Parts(config, store, state, ctx, metrics, clock)
        self.budget = Budget(parts, self.wake)
        self.runner = RepairRunner(parts)
        self._commit = GroupCommit(store, clock)
        self._host_skips = HostSkips(config.receiver.host, config.receiver.fleet, clock)
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
        self.dependents: dict[str, list[str]] = {name: [] for name in config.services}
        for name, cfg in config.services.items():
            for dep in cfg.depends_on:
                self.dependents[dep].append(name)

    async def db(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call (a read, or the checkpoint) on the store's own thread
        (:meth:`Store.off_loop <receiver.store.Store.off_loop>`). Writes are made on the
        loop: see :class:`~receiver.store.Store`."""
        return await self.store.off_loop(func, *args, **kwargs)

    @property
    def exhausted(self) -> dict[str, datetime]:
        """Services whose budget is spent, and since when (see :class:`~receiver.budget.Budget`)."""
        return self.budget.exhausted

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
            if entry.state == EntryState.INTERRUPTED:
                log.error("repair #%d (%s of %s) was interrupted by a receiver restart; its problem is worked on "
                          "again if it is still open", entry.id, entry.action, entry.service_name)
                if entry.service_name in self.config.services:
                    self.metrics.remediations.labels(entry.action, entry.service_name, RepairResult.FAILURE).inc()
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
            self.budget.restore(name, state)
            self.metrics.paused.labels(name).set(1 if state.paused_at(self.clock()) else 0)
            self.metrics.next_attempt.labels(name).set(state.next_attempt_at)
        for problem in await self.db(self.store.open_problems):
            if problem.service_name in self.config.services:
                self.wake(problem.service_name)

    async def stop(self) -> None:
        """Cancel repairs in flight (they will be marked interrupted on the next start).

        A worker whose cancellation was swallowed (redis-py's asyncio client loses it
        when it lands mid-command, often) ends at its next step all the same: it is
        woken, starts no repair, and leaves its loop."""
        self._stopped = True
        for task in [*self._tasks, *self._workers.values()]:
            task.cancel()
        for event in self._wake.values():
            event.set()
        await asyncio.gather(*self._tasks, *self._workers.values(), return_exceptions=True)

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
        # Raises SharedStateError (the webhook answers 503) before anything is recorded.
        decisions = await self.state.claim(alerts, decisions)
        ids = await self._commit.write(audit_rows(alerts, decisions, self.clock, self._host_skips))
        duplicates = queued = 0
        metrics = self.metrics
        for alert, decision, entry_id in zip(alerts, decisions, ids, strict=True):
            metrics.received[alert.status] += 1
            if decision.acts or (decision.reason == _RESOLVED and decision.service_name):
                if decision.acts and entry_id is not None and self._new_kind(decision, alert):
                    self._urgent.add(decision.service_name)
                self.wake(decision.service_name)
            if decision.reason in AGGREGATED:
                metrics.skip(decision.service_name, decision.reason)
            elif entry_id is None:
                duplicates += 1
                metrics.skip(decision.service_name, _DUPLICATE)
            elif decision.reason:
                metrics.skip(decision.service_name, decision.reason)
                if decision.reason not in RECORDED_AS:
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

    # --- the worker: one per service with open problems ----------------------------------------
    async def _work(self, service: str) -> None:
        wake = self._wake[service]
        last_look = 0.0
        gap = LOOK_INTERVAL
        try:
            while not self._stopped:
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
                self.store.close_problem(problem.id, ProblemState.EXPIRED, now)
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
            try:
                token = await self.state.acquire(service, self.runner.deadline(service) + 30.0)
            except SharedStateError as err:
                log.error("shared state (Redis) unavailable, not repairing %s: %s", service, err)
                self._record(min(problems, key=_order), AuditDecision.SKIPPED, Reason.SHARED_STATE_ERROR, None)
                return self._next_look(service)
            if token is None:  # another receiver repairs it now; it looks again after
                self._record(min(problems, key=_order), AuditDecision.SKIPPED, Reason.IN_PROGRESS, None)
                return self.config.receiver.recheck_interval
            try:
                return await self._look(service, problems)
            finally:
                try:
                    await self.state.release(service, token)
                except SharedStateError as err:
                    log.error("could not release the repair lock of %s (it expires by itself): %s", service, err)

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
            if assessment.reason == Reason.CONDITION_CLEARED:
                if problem.attempts == 0:  # a stale alert: say so, once; after a repair it is expected
                    self._record(problem, AuditDecision.SKIPPED, Reason.CONDITION_CLEARED, assessment.observation)
                waits.append(assessment.wait)
                continue
            if assessment.reason in _ABOUT_THE_PROBLEM:  # the service's other problems may still be worked on
                self._record(problem, AuditDecision.SKIPPED, assessment.reason, assessment.observation)
                waits.append(assessment.wait)
                continue
            self._seen_kinds[service] = set(seen)
            if assessment.reason == Reason.BUDGET_EXHAUSTED:
                return await self._enter_backoff(service, problem, assessment.observation)
            if assessment.reason:
                self._record(problem, AuditDecision.SKIPPED, assessment.reason, assessment.observation)
                return assessment.wait
            self._seen_kinds[service] = set(seen)
            assert assessment.state is not None
            if self._stopped:  # shutting down (its cancellation lost on the way): no new repair
                return 0.0
            await self._attempt(service, problem, assessment.observation, assessment.state)
            return 0.0
        self._seen_kinds[service] = set(seen)
        return min(waits, default=self._next_look(service))

    def _record(self, problem: Problem, decision: str, reason: str, observation: Any) -> None:
        """A decision not to act, written once while it stays the same."""
        if problem.last_decision == reason or (problem.last_decision, reason) == (Reason.BUDGET_EXHAUSTED,
                                                                                  Reason.BACKOFF):
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
            return Assessment(Reason.PAUSED, {"paused_until": until, "reason": state.paused_reason},
                              min(MAX_RECHECK_SECONDS, until - now) if until else MAX_RECHECK_SECONDS)
        for dep in cfg.depends_on:
            seen = await observe(self.ctx, dep)
            if not seen.healthy:
                return Assessment(Reason.DEPENDENCY_UNHEALTHY, {"dependency": dep, **seen.as_json()},
                                  self._next_look(service))
        seen = await observe(self.ctx, service, alertname, labels, self.clock)
        # A condition the receiver cannot observe: act once; again only if that repair is
        # a restart and the service is unhealthy (an exec or http call does not start it).
        holds = seen.holds if seen.holds is not None else (
            attempts == 0 or (not seen.healthy and "restart" in action.split(",")))
        observation = seen.as_json()
        if not holds:
            return Assessment(Reason.CONDITION_CLEARED, observation, self._next_look(service))
        if seen.escalate and any(step in ("restart", "signal") for step in action.split(",")):
            log.error("%s: %s; a restart cannot fix that: a person must look", service, seen.condition)
            return Assessment(Reason.ESCALATED, observation, MAX_RECHECK_SECONDS)
        if "exec" in action.split(",") and cfg.remediation.exec is not None:
            try:
                exec_argv(cfg.remediation.exec.argv, dict(cfg.remediation.exec.labels), dict(labels))
            except RepairFailed as err:
                return Assessment(Reason.INVALID_LABEL, {**observation, "error": str(err)}, MAX_RECHECK_SECONDS)
        try:
            wait = await self.budget.due_in(service, state, now, action)
        except SharedStateError as err:
            log.error("shared state (Redis) unavailable, not repairing %s: %s", service, err)
            return Assessment(Reason.SHARED_STATE_ERROR, observation, self._next_look(service))
        if wait:
            reason = Reason.BACKOFF if state.exhausted_since is not None else Reason.COOLDOWN
            return Assessment(reason, {**observation, "next_attempt_at": now + wait}, wait)
        if state.exhausted_since is None and await self.budget.spent(service, now):
            return Assessment(Reason.BUDGET_EXHAUSTED, observation, 0.0)
        if self.dry_run:
            return Assessment(Reason.DRY_RUN, observation, MAX_RECHECK_SECONDS)
        return Assessment("", observation, state=state)

    # --- an attempt ------------------------------------------------------------------------------
    async def _attempt(self, service: str, problem: Problem, observation: Any, state: ServiceState) -> None:
        """Run the problem's repair once (``assess`` allowed it, under the slot), then schedule the next."""
        self._changes += 1
        result = await self.runner.run(service, problem, observation)
        self.budget.after_attempt(service, state, problem.action, result)
        if result == RepairResult.SUCCESS:
            for dependent in self.dependents[service]:
                if self._workers.get(dependent) is not None:
                    self.wake(dependent)

    async def _enter_backoff(self, service: str, problem: Problem, observation: Any) -> float:
        """The budget is spent: say so loudly, and space the next attempts out."""
        delay = await self.budget.enter_backoff(service)
        self._record(problem, AuditDecision.SKIPPED, Reason.BUDGET_EXHAUSTED, observation)
        return delay

    def repair_deadline(self, service: str) -> float:
        """Seconds one repair of ``service`` may take (:meth:`RepairRunner.deadline
        <receiver.runner.RepairRunner.deadline>`)."""
        return self.runner.deadline(service)

    # --- budgets and pauses -----------------------------------------------------------------------
    async def reset(self, service: str, reason: str) -> bool:
        """Re-enable repairs of ``service`` at once; True if its budget was spent."""
        return await self.budget.reset(service, reason)

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
        """Every ``interval`` seconds: keep the exhausted alerts firing and re-enable a
        service once healthy long enough (:meth:`Budget.watch_once
        <receiver.budget.Budget.watch_once>`); also end pauses whose time is up (for the metric)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.watch_once()
            except Exception:  # this loop keeps CaretakerRepairsExhausted firing: it must not end
                log.exception("watching exhausted and paused services; trying again in %gs", interval)

    async def watch_once(self) -> None:
        """One pass of :meth:`watch_exhausted`, at the time ``clock`` says."""
        await self.budget.watch_once()
        now = self.clock()
        for service in self.config.services:
            state = await self.db(self.store.service_state, service)
            self.metrics.paused.labels(service).set(1 if state.paused_at(now) else 0)

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
            if problem.state == ProblemState.OPEN:
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
