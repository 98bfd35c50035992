"""Heartbeats against careless apps and hostile clients: a sender told to report every 0
seconds, query strings no client of ours sends, and an app that forks its workers after
making its heartbeat (gunicorn's preload)."""

from __future__ import annotations

import math

import pytest

from caretaker_client import Heartbeat


@pytest.mark.parametrize(("option", "value"), [
    ("interval", 0), ("interval", -1), ("interval", math.nan), ("interval", math.inf),
    ("timeout", 0), ("timeout", -0.5), ("timeout", math.nan),
])
def test_a_heartbeat_needs_a_positive_interval_and_timeout(option: str, value: float) -> None:
    """Heartbeat(interval=0) spun at full CPU in the app's process: a programming error,
    told at once."""
    with pytest.raises(ValueError, match=f"{option} must be a number of seconds more than 0"):
        Heartbeat("x", "http://127.0.0.1:1", **{option: value})
