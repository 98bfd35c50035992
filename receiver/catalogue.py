"""Every repair the receiver knows, by the name an alert's ``remediation`` label uses."""

from __future__ import annotations

from exporter.config import REMEDIATION_ACTIONS

from . import actions, claims, repairs
from .actions import ActionContext, ActionFunc, RepairFailed, StepLog

__all__ = ["CATALOGUE", "run_action"]

CATALOGUE: dict[str, ActionFunc] = {**actions.ACTIONS, **repairs.ACTIONS, **claims.ACTIONS}
assert set(CATALOGUE) == set(REMEDIATION_ACTIONS), "the config's actions and the catalogue must agree"


async def run_action(ctx: ActionContext, action: str, name: str, step: StepLog) -> None:
    """Run a known repair; ``action`` must be one the service allows (checked by the caller)."""
    func = CATALOGUE.get(action)
    if func is None:
        raise RepairFailed(f"unknown action {action!r}")
    await func(ctx, name, step)
