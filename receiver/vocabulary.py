"""The audit trail's vocabulary: every decision, state, result and reason the receiver writes.

These are the words a person reads in ``GET /api/v1/remediations``, ``GET
/api/v1/problems``, ``caretakerctl problems`` and the ``reason`` label of
``caretaker_alerts_skipped_total``. Each is an :class:`enum.StrEnum`, so a member *is*
its string: what is stored in SQLite, written as JSON and used as a label value is
byte-for-byte the text below, and rows written by older receivers read back equal to
the members.

An audit entry (a row of ``remediations``) has a :class:`AuditDecision`, a
:class:`Reason` (``""`` when the decision is to act or to queue), an
:class:`EntryState` and, once a repair has run, a :class:`RepairResult`. A problem (a
row of ``problems``) has a :class:`ProblemState`; its ``last_decision`` is the last
entry's reason, or ``acted``.

Hot paths (the webhook's admission: one decision and one row per alert) bind the plain
values to module constants once, e.g. ``_SKIPPED = AuditDecision.SKIPPED.value``: on
Python 3.11 looking a member up costs about 0.2 us, and SQLite binds an exact ``str``
faster than a subclass of it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AuditDecision", "EntryState", "ProblemState", "Reason", "RepairResult"]


class AuditDecision(StrEnum):
    """What the receiver decided about an alert or a problem (column ``decision``)."""

    QUEUED = "queued"
    """A firing alert asks for a repair the service allows: it opened (or refreshed) a
    problem, and the service's worker will look at it. Replaced by the first decision
    the worker writes about that problem."""
    RECORDED = "recorded"
    """Nothing to do, and nothing wrong: a resolved notification (it closes its
    problem), or a firing alert that asks for no repair (``no_remediation``)."""
    SKIPPED = "skipped"
    """Not acted on, now or ever; the entry's :class:`Reason` says why."""
    ACTED = "acted"
    """A repair ran (or runs): the entry has its steps, start and end. These entries are
    the attempts the budget counts."""


class EntryState(StrEnum):
    """Where an audit entry is in its life (column ``state``)."""

    QUEUED = "queued"
    """Admitted, waiting for the worker's first decision about its problem."""
    RUNNING = "running"
    """A repair is running; its steps are written as it goes."""
    DONE = "done"
    """Final: decided, or the repair ended (see :class:`RepairResult`)."""
    INTERRUPTED = "interrupted"
    """A repair cut short by a restart of the receiver (marked at the next start, result
    ``failure``). Its problem, still open, is worked on again."""


class RepairResult(StrEnum):
    """How a repair ended (column ``result``; NULL until it ends)."""

    SUCCESS = "success"
    """Every step ran and the service verified healthy."""
    FAILURE = "failure"
    """A step failed, the repair's deadline passed, it crashed, or it was interrupted;
    the last step says which. The next attempt is scheduled."""


class ProblemState(StrEnum):
    """The life of a problem (column ``problems.state``; ``?state=open`` in the API)."""

    OPEN = "open"
    """Its alert fires: the worker observes the service and repairs it while the
    condition holds."""
    CLOSED = "closed"
    """A resolved notification for the same incident (fingerprint and startsAt) came."""
    EXPIRED = "expired"
    """No notification refreshed it for ``receiver.problem_ttl``."""


class Reason(StrEnum):
    """Why an alert or a problem was not acted on (column ``reason``; the ``reason`` label
    of ``caretaker_alerts_skipped_total``, a fixed set: every member, in this order, is
    a label value from the first scrape on)."""

    DUPLICATE = "duplicate"
    """The same alert (fingerprint, startsAt, status) was received before, or another
    receiver sharing the state claimed it first."""
    RESOLVED = "resolved"
    """A resolved notification: recorded, and it closes its problem."""
    NO_REMEDIATION = "no_remediation"
    """The alert has no ``remediation`` label and no ``receiver.rules`` entry matches it."""
    NO_SERVICE_NAME = "no_service_name"
    """The alert has no ``service_name`` label."""
    UNKNOWN_SERVICE = "unknown_service"
    """Its ``service_name`` is not in the config."""
    UNKNOWN_ACTION = "unknown_action"
    """Its ``remediation`` is not a repair caretaker knows."""
    ACTION_NOT_ALLOWED = "action_not_allowed"
    """The service's ``remediation.allow`` does not list that repair."""
    COOLDOWN = "cooldown"
    """The same repair ran less than ``receiver.cooldown`` ago: this problem waits."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """``attempts.max`` repairs within ``attempts.window``: the service is exhausted and
    attempts go on with backoff."""
    DRY_RUN = "dry_run"
    """The receiver runs with ``--dry-run``: it decides and repairs nothing."""
    RECEIVER_RESTARTED = "receiver_restarted"
    """Queued when the receiver stopped, and its problem was no longer open after the restart."""
    IN_PROGRESS = "in_progress"
    """Another receiver sharing the state holds the service's repair lock now."""
    SHARED_STATE_ERROR = "shared_state_error"
    """The shared state (Redis) could not be reached: nothing is repaired without it."""
    CONDITION_CLEARED = "condition_cleared"
    """Observed now, the alert's condition no longer holds: nothing is stopped."""
    DEPENDENCY_UNHEALTHY = "dependency_unhealthy"
    """A service in its ``depends_on`` is unhealthy now: that one goes first."""
    PAUSED = "paused"
    """An operator paused the service's repairs."""
    ESCALATED = "escalated"
    """What is observed says this repair cannot help (a probe failing for auth or tls):
    a person must look."""
    BACKOFF = "backoff"
    """The service is exhausted and its next attempt is not due yet."""
    INVALID_LABEL = "invalid_label"
    """A label an ``exec`` repair uses does not match its pattern: a skip, not an attempt."""
    OTHER_HOST = "other_host"
    """The alert's ``host`` label names another host than ``receiver.host``: that host's
    receiver repairs it, never this one (firing or resolved)."""
    NO_HOST = "no_host"
    """In fleet mode (``receiver.fleet``), the alert has no ``host`` label: which host it is
    about is unknown, so no receiver acts on it."""
