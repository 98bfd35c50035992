"""Heartbeats: a watchdog that apps feed, kept across exporter restarts.

An app calls ``POST /heartbeat/NAME`` (optionally ``?pid=PID``) every so often, or
``POST /heartbeat/NAME/fail`` to say it is in trouble. With :mod:`caretaker_client`
the report also says how many times the app's work loop beat since the previous one
(``&beats=N``): the heartbeat then proves progress, not only a live process. A plain
feed (no ``beats``) still counts as a heartbeat. Only names in the config exist
(others are refused, so no series appears from a typo). The reporting pid is
remembered with its start time, so "is it still alive" is answered for that process,
not for whoever has its pid now.

State is saved to ``exporter.state_file`` as JSON, written to a temporary file and
renamed over the old one (atomic), at most once per :data:`SAVE_INTERVAL` and at
shutdown. A state file that does not parse is kept aside (``.corrupt``), not lost.
:func:`read_saved` reads it (the receiver does, to confirm and to verify). Its shape::

    {"heartbeats": {"worker": {"last_seen": 1763700000.5, "last_failure": 0.0, "pid": 4242,
                               "pid_start_ticks": 123456, "received": 17, "failures": 0, "beats": 5120}}}
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .private import private_dir, write_private
from .procfs import ProcReader

__all__ = ["HeartbeatState", "HeartbeatStore", "read_saved"]

log = logging.getLogger(__name__)

SAVE_INTERVAL = 1.0


@dataclass
class HeartbeatState:
    last_seen: float = 0.0
    """Unix seconds of the last heartbeat; 0 before the first."""
    last_failure: float = 0.0
    pid: int = 0
    pid_start_ticks: int = 0
    received: int = 0
    """Heartbeats received (reports and plain feeds)."""
    failures: int = 0
    beats: int = 0
    """Work-loop beats the app reported with its heartbeats (``beats=N``); a plain feed
    adds none."""


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_saved(path: Path) -> dict[str, HeartbeatState]:
    """The heartbeats in the state file ``path``, by name (blocking; a small file).

    A file without heartbeats gives ``{}``; an entry that is not an object of numbers is
    skipped (with a warning); unknown fields are ignored (a newer exporter's file reads).
    Raises ``FileNotFoundError`` when there is none yet, ``OSError`` when it cannot be
    read, ``ValueError`` when it is not the JSON shape above.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"a JSON object was expected, not {type(data).__name__}")
    saved = data.get("heartbeats", {})
    if not isinstance(saved, dict):
        raise ValueError(f"\"heartbeats\" must be an object, not {type(saved).__name__}")
    states = {}
    for name, fields in saved.items():
        known = ({k: v for k, v in fields.items() if k in HeartbeatState.__dataclass_fields__}
                 if isinstance(fields, dict) else None)
        if known is None or not all(_finite_number(v) for v in known.values()):
            log.warning("ignoring saved heartbeat %s: %r", name, fields)
            continue
        state = states[name] = HeartbeatState()
        for key, value in known.items():
            setattr(state, key, type(getattr(state, key))(value))  # the field's type: float or int
    return states


class HeartbeatStore:
    def __init__(self, path: Path, names: Iterable[str], reader: ProcReader | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.reader = reader or ProcReader()
        self.clock = clock
        self.states = {name: HeartbeatState() for name in names}
        self.dirty = False

    def load(self) -> None:
        """Read the saved state; unknown names are dropped, a corrupt file is set aside."""
        try:
            saved = read_saved(self.path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.error("heartbeat state %s is unreadable (%s); moved to %s, starting empty", self.path, err, aside)
            try:
                self.path.replace(aside)
            except OSError as move_err:
                log.error("could not move it aside: %s", move_err)
            return
        for name, state in saved.items():
            if name in self.states:
                self.states[name] = state

    def save(self) -> None:
        """Write the state atomically (blocking: call from a thread)."""
        self.dirty = False
        private_dir(self.path.parent)
        write_private(self.path, json.dumps({"heartbeats": {k: asdict(v) for k, v in self.states.items()}}).encode())

    def _remember_pid(self, state: HeartbeatState, pid: int | None) -> None:
        if pid is None:
            return
        info = self.reader.stat(pid)
        state.pid, state.pid_start_ticks = (pid, info.start_ticks) if info else (pid, 0)

    def beat(self, name: str, pid: int | None = None, beats: int = 0) -> None:
        """A heartbeat of ``name`` now, from ``pid``, vouching for ``beats`` work-loop beats."""
        state = self.states[name]
        state.last_seen = self.clock()
        state.received += 1
        state.beats += beats
        self._remember_pid(state, pid)
        self.dirty = True

    def fail(self, name: str, pid: int | None = None) -> None:
        state = self.states[name]
        state.last_failure = self.clock()
        state.failures += 1
        self._remember_pid(state, pid)
        self.dirty = True

    def process_alive(self, name: str) -> bool:
        """True when a pid was reported and that same process (pid + start time) runs."""
        state = self.states[name]
        if not state.pid:
            return False
        info = self.reader.stat(state.pid)
        return info is not None and info.start_ticks == state.pid_start_ticks

    def healthy(self, name: str, timeout: float, now: float | None = None, alive: bool | None = None) -> bool:
        """Fed within ``timeout`` seconds, not failed since, and its process (if any) alive.

        ``alive`` is :meth:`process_alive` when the caller already knows it (it reads /proc).
        """
        state = self.states[name]
        now = self.clock() if now is None else now
        if not state.last_seen or now - state.last_seen > timeout or state.last_failure > state.last_seen:
            return False
        return not state.pid or (self.process_alive(name) if alive is None else alive)
