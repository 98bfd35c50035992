"""Alertmanager's label matcher grammar, for ``receiver.rules[].match``.

``alertname="X", service_name=~"a|b"``, optionally in braces, as in Alertmanager's
configuration (https://prometheus.io/docs/alerting/latest/configuration/#matcher).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Matcher", "parse_matchers"]

_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|[^,"{}\s]+)\s*(?:,|$)')


@dataclass(frozen=True)
class Matcher:
    """One Alertmanager label matcher: ``name op value`` (regexes are fully anchored)."""

    name: str
    op: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        got = labels.get(self.name, "")
        if self.op in ("=", "!="):
            return (got == self.value) == (self.op == "=")
        return (re.fullmatch(self.value, got) is not None) == (self.op == "=~")


def parse_matchers(text: str) -> tuple[Matcher, ...]:
    """Alertmanager's matcher list syntax: ``alertname="X", service_name=~"a|b"``,
    optionally in braces (https://prometheus.io/docs/alerting/latest/configuration/#matcher).
    Raises ``ValueError`` naming the part that does not parse."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    out, pos = [], 0
    while pos < len(body):
        m = _MATCHER.match(body, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot parse matcher at {body[pos:pos + 30]!r} (expected name=\"value\", "
                             "name!=..., name=~..., name!~...)")
        name, op, raw = m.group(1), m.group(2), m.group(3)
        value = json.loads(raw) if raw.startswith('"') else raw
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"invalid regular expression in {name}{op}{raw}: {err}") from err
        out.append(Matcher(name, op, value))
        pos = m.end()
    if not out:
        raise ValueError("no matchers")
    return tuple(out)
