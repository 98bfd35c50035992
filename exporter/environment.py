"""The environment of the programs caretaker runs: minimal, never its own.

The exporter and the receiver hold credentials in their environment (the receiver's
bearer token, ``REDIS_PASSWORD``, ``PGPASSWORD``...). What they start gets PATH and
LANG only, and whatever the configuration passes by name, as systemd does for a unit
(``Environment=``, ``PassEnvironment=``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

__all__ = ["DEFAULT_PATH", "minimal_environment"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""systemd's default PATH, used when the caller has none."""


def minimal_environment(inherit: Iterable[str] = (), extra: Mapping[str, str] | None = None,
                        source: Mapping[str, str] | None = None) -> dict[str, str]:
    """PATH and LANG from ``source`` (default: this process's environment), the
    variables named in ``inherit`` that ``source`` has, then ``extra``."""
    source = os.environ if source is None else source
    env = {"PATH": source.get("PATH") or DEFAULT_PATH, "LANG": source.get("LANG") or "C.UTF-8"}
    env.update({name: source[name] for name in inherit if name in source})
    env.update(extra or {})
    return env
