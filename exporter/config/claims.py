"""``services.<name>.claims``: the work items a service's workers claim in Redis, where
their claims live, how to tell an orphaned claim (its owner is gone) from an active one,
and what releasing it means (the ``release_claims`` repair).

Every default is the layout caretaker's client writes (``caretaker_client.claims``),
the layout of the issue this came from::

    processing_issues      SET   ids of items being worked on
    issue:{id}             HASH  status=processing, processId=..., pid=..., host=..., startTime=ISO-8601
    heartbeat:{processId}  STRING with a TTL, refreshed by the worker
    task_queue             LIST  where released work goes back

so for that layout ``claims: {port: 6379}`` is the whole configuration.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Literal, get_args

from pydantic import Field

from .probes import RedisConnection
from .types import DocDefault, Model, PositiveSeconds, Problem

__all__ = ["CLAIM_TIME_FORMATS", "Claims", "ClaimsRelease", "pattern_placeholders"]

ClaimTimeFormat = Literal["iso8601", "epoch_seconds", "epoch_ms"]
CLAIM_TIME_FORMATS: tuple[str, ...] = get_args(ClaimTimeFormat)
ClaimTimeZone = Literal["either", "utc", "local"]
FieldName = Annotated[str, Field(min_length=1, max_length=200, examples=["status"])]
KeyName = Annotated[str, Field(min_length=1, max_length=1000)]
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def pattern_placeholders(pattern: str) -> tuple[list[str], bool]:
    """The ``{name}`` placeholders of a key pattern, and whether a brace is left over
    (``issue:{id`` or ``issue:}``)."""
    names = _PLACEHOLDER.findall(pattern)
    stray = "{" in _PLACEHOLDER.sub("", pattern) or "}" in _PLACEHOLDER.sub("", pattern)
    return names, stray


def _pattern_problems(key: str, pattern: str, known: tuple[str, ...], required: str | None) -> Iterator[Problem]:
    names, stray = pattern_placeholders(pattern)
    allowed = ", ".join("{" + k + "}" for k in known)
    for name in names:
        if name not in known:
            yield (key,), f"unknown placeholder {{{name}}} in {pattern!r}; it may use {allowed}"
    if stray:
        yield (key,), f"unbalanced brace in {pattern!r}; placeholders are {allowed}"
    if required is not None and required not in names:
        yield (key,), f"{pattern!r} must contain {{{required}}} (one key per item)"


class ClaimsRelease(Model):
    """What ``release_claims`` does to each claim that is still orphaned when it acts, in
    one Lua script per claim that first checks, atomically, that the id is still claimed,
    its owner, claim time, pid and host are unchanged, its heartbeat is still absent, the
    item is a hash and ``push_to`` a list. It always removes the id from ``claimed_key``
    (that ends the claim, so releasing it again is a no-op); then it deletes
    ``delete_fields``, sets ``set_fields``, and pushes the id to ``push_to``."""

    push_to: KeyName | None = Field(default="task_queue", examples=["task_queue"])
    """List the id is pushed back to, so that a worker takes it again; one key, written as
    it is (no placeholders). None: not pushed, and then ``set_fields`` must mark the item
    for the app to find it again."""
    push_end: Literal["left", "right"] = "right"
    """End of ``push_to`` the id goes to: ``right`` (``RPUSH``) for a queue that producers
    ``LPUSH`` to and workers ``BRPOP`` from, so that the released item is taken next;
    ``left`` (``LPUSH``) puts it behind the waiting ones."""
    set_fields: dict[FieldName, str] = Field(default_factory=lambda: {"status": "queued"},
                                             examples=[{"status": "queued"}])
    """Fields of the item's hash set on release; may be empty only with ``push_to``."""
    delete_fields: tuple[FieldName, ...] | None = Field(
        default=None, examples=[["processId", "pid", "host", "startTime"]],
        json_schema_extra=DocDefault("the owner, pid, host and claim time fields"))
    """Fields of the item's hash deleted on release (before ``set_fields`` are set)."""
    max_per_repair: int = Field(default=100, ge=1, le=100_000)
    """Claims released by one repair at most (the oldest first); the rest wait for the
    next attempt, while the alert still fires."""


class Claims(RedisConnection):
    """Work items the service's workers claim in Redis. A claim is *orphaned* when its
    owner's heartbeat key is gone and its owner process is not alive: the pid is not
    running, or runs a process that started after the claim (a reused pid). An owner on
    another host (``host_field`` names another host) is judged by its heartbeat alone.
    With ``max_age``, an older claim is orphaned whatever its owner says. A claim that
    cannot be judged (no item hash, no owner, a pid or claim time that does not parse) is
    counted as ``invalid`` and never released. Scanned with ``SSCAN``/``ZSCAN`` and
    pipelined ``HMGET``/``EXISTS``, never ``KEYS``: the exporter's Redis user needs only
    those; the receiver's also ``EVALSHA`` and ``SCRIPT`` (the release is a Lua
    script) and the writes of the release. Not for Redis Cluster."""

    db: int = Field(default=0, ge=0)
    """Redis database number."""
    timeout: PositiveSeconds = 5.0
    """How long one scan may take, and each Redis command. A scan that is not done when
    the scrape must answer goes on and serves the next scrape (counted as a ``timeout``)."""
    claimed_key: KeyName = Field(default="processing_issues", examples=["processing_issues"])
    """Key of the set (or sorted set) of the ids being worked on; one key, written as it is
    (no placeholders)."""
    claimed_type: Literal["set", "zset"] = "set"
    """Type of ``claimed_key``: ``set`` (``SSCAN``) or ``zset`` (``ZSCAN``; the scores are
    not used)."""
    item_key: KeyName = Field(default="issue:{id}", examples=["issue:{id}"])
    """Key of each item's hash; ``{id}`` is the id from ``claimed_key``."""
    owner_field: FieldName = Field(default="processId", examples=["processId"])
    """Field of the item naming its owner (a worker's id); a claim without it is invalid."""
    pid_field: FieldName | None = Field(default="pid", examples=["pid"])
    """Field holding the owner's process id; none: the owner is judged by its heartbeat only."""
    host_field: FieldName | None = Field(default="host", examples=["host"])
    """Field holding the owner's host name; an owner on another host is judged by its
    heartbeat only. None, or an empty value: the owner is on this host."""
    claim_time_field: FieldName = Field(default="startTime", examples=["startTime"])
    """Field holding when the item was claimed; a claim without it is invalid."""
    claim_time_format: ClaimTimeFormat = "iso8601"
    """Format of ``claim_time_field``: ISO 8601 (``2026-12-02T13:02:04.123Z``, or with an
    offset; without one, see ``claim_time_zone``), or Unix time in seconds or milliseconds.
    A claim time before 2001 or more than 5 minutes ahead of this host's clock is a unit or
    zone mix-up: the claim is invalid (``bad_claim_time``), never released."""
    claim_time_zone: ClaimTimeZone = "either"
    """How to read an ISO 8601 claim time without an offset (a time with ``Z`` or an offset
    is exact whatever this says): ``utc`` (what Python's ``datetime.utcnow().isoformat()``
    writes), ``local``, this host's time zone (``datetime.now().isoformat()``, written on
    a host in the same zone), or ``either``: both readings are tried and the later one
    that is not in the future is taken, so a zone mix-up never makes a live worker's claim
    look older than it is (as a reused pid, or past ``max_age``); a claim older than this
    host's UTC offset may then look younger by it, and be found orphaned that much later.
    Give ``utc`` or ``local`` when you know it."""
    heartbeat_key: KeyName | None = Field(default="heartbeat:{owner}", examples=["heartbeat:{owner}"])
    """Key the owner keeps alive with a TTL while it works; ``{owner}`` is the owner field,
    ``{id}`` the item's id. None: the owner is judged by its pid only."""
    max_age: PositiveSeconds | None = Field(default=None, examples=["6h"])
    """A claim older than this is orphaned whatever its owner says (a worker stuck
    forever); none: no limit."""
    release: ClaimsRelease = ClaimsRelease()
    """What releasing an orphaned claim does."""

    def cross_check(self) -> Iterator[Problem]:
        yield from _pattern_problems("item_key", self.item_key, ("id",), "id")
        if self.heartbeat_key is not None:
            yield from _pattern_problems("heartbeat_key", self.heartbeat_key, ("owner", "id"), None)
        if self.heartbeat_key is None and self.pid_field is None and self.max_age is None:
            yield "give heartbeat_key, pid_field or max_age: without any, no claim can be found orphaned"
        for place, key in ((("claimed_key",), self.claimed_key), (("release", "push_to"), self.release.push_to)):
            if key is not None and ("{" in key or "}" in key):
                yield place, (f"{key!r} has a brace; it is one key, written as it is (no placeholders): a release "
                              "would use it literally")
        if self.release.push_to is not None and self.release.push_to == self.claimed_key:
            yield ("release", "push_to"), f"{self.release.push_to!r} is claimed_key: releasing would re-claim the id"
        if self.release.push_to is None and not self.release.set_fields:
            yield ("release",), ("give push_to or set_fields: a release that only removes the id from claimed_key "
                                 "drops the job (no queue holds it, nothing marks it for a worker to find)")
        fields = self.claim_fields
        if len(set(fields)) < len(fields):
            yield "owner_field, pid_field, host_field and claim_time_field must be different fields"

    @property
    def claim_fields(self) -> tuple[str, ...]:
        """The fields a claim is made of: owner, claim time, then pid and host if given."""
        return tuple(f for f in (self.owner_field, self.claim_time_field, self.pid_field, self.host_field)
                     if f is not None)

    @property
    def released_fields(self) -> tuple[str, ...]:
        """Fields deleted on release (``release.delete_fields``, default: the claim fields)."""
        return self.claim_fields if self.release.delete_fields is None else self.release.delete_fields
