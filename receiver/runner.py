"""Running one repair: its audit entry and steps, its deadline, its silence, its metrics.

The executor decides *whether* a repair runs (under the service's worker slot and
lock); :class:`RepairRunner` runs it once and says how it ended. It never raises for a
failed repair (that is a ``failure`` result, with the reason in the last step); only
``asyncio.CancelledError`` (the receiver shutting down) and ``sqlite3.Error`` from the
state file get out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from datetime import timedelta
from typing import Any

from .actions import KILL_WAIT_SECONDS, RepairFailed, StepLog
from .alertmanager import expire_silence, host_matcher, silence
from .catalogue import run_action
from .parts import Parts
from .shared import SharedStateError
from .store import Problem
from .vocabulary import AuditDecision, EntryState, RepairResult

__all__ = ["RepairRunner"]

log = logging.getLogger(__name__)

SILENCED_ACTIONS = frozenset({"restart", "stop_duplicates", "free_port"})
"""Repairs that stop or start the service: its alerts are silenced while they run
(``receiver.silence_during_repair``)."""


class RepairRunner:
    """Runs one repair of a problem; times from ``clock`` (Unix seconds)."""

    def __init__(self, parts: Parts) -> None:
        self.config, self.store, self.state = parts.config, parts.store, parts.state
        self.ctx, self.metrics, self.clock = parts.ctx, parts.metrics, parts.clock

    def deadline(self, service: str) -> float:
        """Seconds one repair of ``service`` may take, every step included:
        ``remediation.timeout`` if set, else ``receiver.repair_timeout``, raised for a
        restart to what its stop, kill, start and verification may take."""
        cfg = self.config.services[service]
        if cfg.remediation.timeout is not None:
            return cfg.remediation.timeout
        floor = 0.0
        if "restart" in cfg.remediation.allow and cfg.start is not None:
            floor = cfg.stop.grace_period * 2 + 2 * KILL_WAIT_SECONDS + cfg.start.timeout \
                + cfg.remediation.verify_timeout + 60.0
        return max(self.config.receiver.repair_timeout, floor)

    async def run(self, service: str, problem: Problem, observation: Any) -> RepairResult:
        """Run the problem's repair (its steps in order, stopping at the first failure)
        within :meth:`deadline`, writing its audit entry (``acted``, ``running`` then
        ``done``) and steps as it goes, with ``observation`` (JSON) as what was seen.
        The start and end are also given to the :class:`~receiver.state.RepairState`
        (an error there is logged: the repair has run)."""
        action = problem.action
        started = self.clock()
        entry_id = self.store.record(problem, started, AuditDecision.ACTED, "", observation,
                                     state=EntryState.RUNNING, attempt=True)
        self.store.update(entry_id, started_at=started)
        try:
            await self.state.record_start(service, started)
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
        result = RepairResult.FAILURE
        silence_id = await self._silence(service, action, steps)
        deadline = self.deadline(service)
        try:
            async with asyncio.timeout(deadline):
                for step in action.split(","):  # several steps from a rule: in order, stop at the first failure
                    if "," in action:
                        steps(f"step {step}")
                    await run_action(ctx, step, service, steps)
            result = RepairResult.SUCCESS
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
        self.store.update(entry_id, state=EntryState.DONE, result=result, finished_at=finished, steps=steps.steps)
        try:
            await self.state.record_finish(service, finished)
        except SharedStateError as err:
            log.error("could not record the end of the repair of %s in Redis: %s", service, err)
        log.log(logging.INFO if result == RepairResult.SUCCESS else logging.ERROR, "%s of %s: %s in %.1fs (audit #%d)",
                action, service, result, finished - started, entry_id)
        return result

    async def _silence(self, service: str, action: str, steps: StepLog) -> str | None:
        """Silence the service's alerts while it is stopped and started, if configured:
        the silence's id, or None."""
        recv = self.config.receiver
        if not (recv.silence_during_repair and recv.alertmanager_url):
            return None
        if not SILENCED_ACTIONS & set(action.split(",")):
            return None
        cfg = self.config.services[service]
        duration = timedelta(seconds=cfg.stop.grace_period + cfg.remediation.verify_timeout + 60)
        silence_id = await silence(self.ctx.session, recv.alertmanager_url, {"service_name": service}, duration,
                                   f"caretaker is repairing {service} ({action})", host_matcher(recv.host, recv.fleet))
        steps(f"silenced alerts of {service} in Alertmanager ({silence_id})" if silence_id
              else "could not silence the service's alerts; repairing anyway")
        return silence_id
