"""Heartbeats against careless apps and hostile clients: a sender told to report every 0
seconds, query strings no client of ours sends, and an app that forks its workers after
making its heartbeat (gunicorn's preload)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from caretaker_client import Heartbeat

from .test_exporter import config_with


@pytest.mark.parametrize(("option", "value"), [
    ("interval", 0), ("interval", -1), ("interval", math.nan), ("interval", math.inf),
    ("timeout", 0), ("timeout", -0.5), ("timeout", math.nan),
])
def test_a_heartbeat_needs_a_positive_interval_and_timeout(option: str, value: float) -> None:
    """Heartbeat(interval=0) spun at full CPU in the app's process: a programming error,
    told at once."""
    with pytest.raises(ValueError, match=f"{option} must be a number of seconds more than 0"):
        Heartbeat("x", "http://127.0.0.1:1", **{option: value})


@pytest.mark.parametrize(("query", "error"), [
    ("pid=%C2%B2", "pid must be a positive process id"),  # '²': str.isdigit() says yes, int() says no
    ("pid=%D9%A3", "pid must be a positive process id"),  # Arabic-Indic 3: int() reads it as 3
    ("pid=" + "9" * 5000, "pid must be a positive process id"),  # int() refuses more than 4,300 digits
    ("pid=0", "pid must be a positive process id"),
    ("beats=%C2%B2", "beats must be a positive count"),
    ("beats=%D9%A3", "beats must be a positive count"),
    ("beats=" + "9" * 5000, "beats must be a positive count"),
    ("beats=+5", "beats must be a positive count"),
])
async def test_a_query_no_client_of_ours_sends_is_a_400_with_a_reason(exporter_for: Any, tmp_path: Path,
                                                                      query: str, error: str) -> None:
    """'²' and 5,000-digit numbers made int() raise: 500; an Arabic-Indic digit was taken."""
    client = await exporter_for(config_with({"heartbeats": [{"name": "worker", "timeout": "30s"}]}, tmp_path))
    resp = await client.post(f"/heartbeat/worker?{query}")
    assert resp.status == 400, query[:30]
    assert error in (await resp.json())["error"]
    assert (await client.post("/heartbeat/worker?pid=1&beats=3")).status == 200
