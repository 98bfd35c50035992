"""What the executor's parts share (:class:`~receiver.executor.Executor`,
:class:`~receiver.budget.Budget`, :class:`~receiver.runner.RepairRunner`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from exporter.config import Config

from .actions import ActionContext
from .metrics import ReceiverMetrics
from .state import RepairState
from .store import Store

__all__ = ["Parts"]


@dataclass(frozen=True, slots=True)
class Parts:
    """The objects one receiver's repair machinery works with, made once where the app is
    wired and handed to each part."""

    config: Config
    store: Store
    """The state file (SQLite): problems, the audit trail, the schedule."""
    state: RepairState
    """Locks, the attempts counted, resets: this host's or the HA pair's."""
    ctx: ActionContext
    metrics: ReceiverMetrics
    clock: Callable[[], float]
    """Unix seconds, for every time that is stored or compared with a stored one;
    injected so that a test moves time on instead of waiting."""
