"""Configuration errors, and the place in the file each one names.

A problem reads ``services.redis.probes[0].timeout (line 14): must not be negative``:
pydantic's location written as the file's key path, and the line of that key (or of
its parent, for a key that is missing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .types import PROBE_TYPES

__all__ = ["ConfigError", "Lines", "describe", "format_loc"]

Lines = Mapping[tuple[Any, ...], int]
"""Line (1-based) of each key path in the file: ``("services", "redis", "probes", 0)``."""


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` holds one ``place: message`` each;
    ``source`` is the file (or ``"config"``)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def format_loc(loc: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """Pydantic's loc as ``services.redis.probes[0].timeout``, and the YAML path.

    Discriminated unions put the tag (``http``) after the list index; it is not a
    key of the file, so it is dropped.
    """
    text = ""
    path: list[Any] = []
    previous_was_index = False
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            path.append(part)
            previous_was_index = True
            continue
        if previous_was_index and part in PROBE_TYPES:
            previous_was_index = False
            continue
        previous_was_index = False
        text += f".{part}" if text else str(part)
        path.append(part)
    return text or "(top level)", tuple(path)


def describe(loc: tuple[Any, ...], lines: Lines) -> str:
    """``services.redis.probes[0].timeout (line 14)``: the place and, when known, the line
    of the key (or of its parent, for a key that is not in the file)."""
    place, path = format_loc(loc)
    line = lines.get(path)
    if line is None:
        line = lines.get(path[:-1])
    return f"{place}{f' (line {line})' if line else ''}"
