"""The exporter's heartbeats, as the receiver reads them: the one place it does.

The exporter keeps the heartbeats apps feed in ``exporter.state_file`` (JSON, written
atomically, at most once per :data:`exporter.heartbeats.SAVE_INTERVAL` second; format
and reader in :func:`exporter.heartbeats.read_saved`). The receiver reads that file,
on the same host and clock:

- to confirm ``CaretakerHeartbeatMissing`` before acting (:func:`late`): a heartbeat is
  late when it was never fed or not within its ``timeout``;
- to verify a restart (:func:`fed_since`): a service with heartbeats is back only when
  each of them has been fed after the restart began, by the new incarnation's work loop.

Both block (a small file read): call them from a thread.
"""

from __future__ import annotations

from collections.abc import Iterable

from exporter.config import Config
from exporter.heartbeats import HeartbeatState, read_saved

__all__ = ["HeartbeatStateUnreadable", "fed_since", "late", "read"]


class HeartbeatStateUnreadable(Exception):
    """The exporter's heartbeat state file is missing or cannot be read; the message names it."""


def read(config: Config) -> dict[str, HeartbeatState]:
    """The heartbeats in the exporter's state file, by name. Raises
    :class:`HeartbeatStateUnreadable` (missing, unreadable, not the exporter's format)."""
    path = config.resolve(config.exporter.state_file)
    try:
        return read_saved(path)
    except FileNotFoundError as err:
        raise HeartbeatStateUnreadable(f"the exporter's heartbeat state {path} does not exist (no heartbeat "
                                       "received yet, or the exporter runs with another config)") from err
    except (OSError, ValueError) as err:
        raise HeartbeatStateUnreadable(f"cannot read the exporter's heartbeat state {path}: {err}") from err


def late(config: Config, service: str, name: str | None, now: float) -> tuple[bool | None, str]:
    """Whether heartbeat ``name`` of ``service`` (any of them when ``None``) is late at
    ``now`` (Unix seconds), and what was seen in words. ``None`` when it cannot be told:
    no such heartbeat, or the state file cannot be read."""
    beats = [hb for hb in config.services[service].heartbeats if name is None or hb.name == name]
    if not beats:
        return None, "no such heartbeat"
    try:
        saved = read(config)
    except HeartbeatStateUnreadable as err:
        return None, str(err)
    overdue = []
    for hb in beats:
        last = saved[hb.name].last_seen if hb.name in saved else 0.0
        if not last or now - last > hb.timeout:
            overdue.append(f"{hb.name} last seen {now - last:.0f}s ago" if last else f"{hb.name} never seen")
    return bool(overdue), "; ".join(overdue) or "heartbeats fresh"


def fed_since(config: Config, names: Iterable[str], since: float) -> tuple[dict[str, HeartbeatState], str]:
    """Which heartbeats of ``names`` were fed after ``since`` (Unix seconds) and not
    reported failing after that: ``(their states by name, why the others are not, in
    words)``; the words are empty when all were."""
    try:
        saved = read(config)
    except HeartbeatStateUnreadable as err:
        return {}, str(err)
    fresh, missing = {}, []
    for name in names:
        state = saved.get(name)
        if state is None or not state.last_seen:
            missing.append(f"heartbeat {name} never fed")
        elif state.last_seen <= since:
            missing.append(f"heartbeat {name} not fed since the restart began "
                           f"(last fed {since - state.last_seen:.1f}s before it)")
        elif state.last_failure > state.last_seen:
            missing.append(f"heartbeat {name} reported failing after the restart")
        else:
            fresh[name] = state
    return fresh, "; ".join(missing)
