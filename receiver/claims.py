"""``release_claims``: give back the work items whose owner died.

The receiver reads the service's claims again (:func:`exporter.claims.scan_claims`,
with its own look at ``/proc`` for the owners' pids: the receiver runs on the host the
claims were judged for), takes the oldest orphaned ones (at most
``claims.release.max_per_repair``) and releases each with one Lua script
(:data:`RELEASE_SCRIPT`) that checks, atomically, that it is still orphaned as the
scan saw it:

- the id is still in ``claimed_key`` (else it was completed, or released, in between);
- the item's owner, claim time, pid and host fields are unchanged, as the verdict
  rested on them (else it was claimed again, or its owner came back under the same
  name);
- the owner's heartbeat key is still absent, when the verdict rested on it (else the
  owner is back);

- the item is a hash, and ``release.push_to`` a list (or absent): every check comes
  before the first write, so the release applies whole or not at all (a queue of the
  wrong type fails the repair and changes nothing);

and only then applies the release: remove the id from ``claimed_key``, delete
``release.delete_fields``, set ``release.set_fields``, push the id to
``release.push_to``. A claim that was completed or re-taken between the scan and the
release is never touched, and a second release of a claim is a no-op (it is no longer
claimed), so the repair is idempotent. The audit entry lists the released ids and the
ones skipped, with why (the first :data:`AUDIT_IDS` of each, and their counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.claims import Claim, ClaimsScanError, ClaimsSeen, Liveness, connect, scan_claims
from exporter.config import Claims, ConfigError
from exporter.procfs import ProcReader

from .actions import ActionContext, ActionFunc, RepairFailed, StepLog

if TYPE_CHECKING:
    import redis

__all__ = ["ACTIONS", "AUDIT_IDS", "RELEASE_SCRIPT", "Released", "find_orphans", "orphaned_now", "release",
           "release_claims"]

log = logging.getLogger(__name__)

AUDIT_IDS = 50
"""Ids listed in an audit step at most (with the count of all)."""

RELEASE_SCRIPT = """
-- KEYS: claimed key, item hash, heartbeat key (the item again when not checked), list to push to
--   (the item again when none). ARGV: id, claimed type, owner field, owner, claim time field,
--   claim time, "1" to check the heartbeat, push end ("" none, "left", "right"), pid field and
--   the pid seen, host field and the host seen (a field "" when not configured; a value seen
--   "=" followed by it, or "-" when the field was absent), the number of fields to delete,
--   those fields, then field/value pairs to set.
-- Every check comes before the first write, so a release applies whole or not at all (a
-- command that fails in a script does not undo the writes before it).
local function unchanged(field, seen)
  if field == "" then return true end
  local now = redis.call("HGET", KEYS[2], field)
  if now then return seen == "=" .. now end
  return seen == "-"
end
if ARGV[2] == "zset" then
  if not redis.call("ZSCORE", KEYS[1], ARGV[1]) then return "completed" end
elseif redis.call("SISMEMBER", KEYS[1], ARGV[1]) == 0 then
  return "completed"
end
if redis.call("TYPE", KEYS[2]).ok ~= "hash" then return "wrong_type" end
if redis.call("HGET", KEYS[2], ARGV[3]) ~= ARGV[4] or redis.call("HGET", KEYS[2], ARGV[5]) ~= ARGV[6]
    or not unchanged(ARGV[9], ARGV[10]) or not unchanged(ARGV[11], ARGV[12]) then
  return "retaken"
end
if ARGV[7] == "1" and redis.call("EXISTS", KEYS[3]) == 1 then return "heartbeat" end
if ARGV[8] ~= "" then
  local queue = redis.call("TYPE", KEYS[4]).ok
  if queue ~= "list" and queue ~= "none" then return "queue_wrong_type" end
end
if ARGV[2] == "zset" then redis.call("ZREM", KEYS[1], ARGV[1]) else redis.call("SREM", KEYS[1], ARGV[1]) end
local deleted = tonumber(ARGV[13])
for i = 14, 13 + deleted do redis.call("HDEL", KEYS[2], ARGV[i]) end
for i = 14 + deleted, #ARGV, 2 do redis.call("HSET", KEYS[2], ARGV[i], ARGV[i + 1]) end
if ARGV[8] == "left" then
  redis.call("LPUSH", KEYS[4], ARGV[1])
elseif ARGV[8] == "right" then
  redis.call("RPUSH", KEYS[4], ARGV[1])
end
return "released"
"""

WHY = {"completed": "no longer claimed: completed or released in between",
       "retaken": "claimed again in between: owner, claim time, pid or host changed",
       "heartbeat": "its owner's heartbeat came back",
       "wrong_type": "its item key is no longer a hash: left alone",
       "queue_wrong_type": "release.push_to is not a list: nothing changed"}
"""What each outcome of the script but ``released`` means, for the audit trail."""
FAILED = ("queue_wrong_type",)
"""Outcomes that fail the repair (with ``error: ...``): a person must fix the data or the config."""


@dataclass(frozen=True)
class Released:
    """The outcome of releasing some orphaned claims: ``(claim, outcome)`` each, the
    outcome ``released`` or a key of :data:`WHY`, or ``error: ...``."""

    outcomes: tuple[tuple[Claim, str], ...]

    def ids(self, outcome: str = "released") -> list[str]:
        return [c.id_text for c, o in self.outcomes if o == outcome]

    def skipped(self) -> list[tuple[Claim, str]]:
        return [(c, o) for c, o in self.outcomes if o != "released"]


def _item_key(spec: Claims, claim: Claim) -> bytes:
    return spec.item_key.encode().replace(b"{id}", claim.item_id)


def _seen(raw: bytes | None) -> bytes:
    """A field as the scan saw it, for the script: ``=value``, or ``-`` when it was absent."""
    return b"-" if raw is None else b"=" + raw


def release(client: redis.Redis, spec: Claims, orphans: tuple[Claim, ...] | list[Claim]) -> Released:
    """Release each of ``orphans`` that is still orphaned as it was seen (blocking):
    one :data:`RELEASE_SCRIPT` per claim, pipelined. Raises redis-py's errors when
    Redis cannot be reached; an error of one claim's script is its outcome."""
    if not orphans:
        return Released(())
    script = client.register_script(RELEASE_SCRIPT)
    rel = spec.release
    deleted = list(spec.released_fields)
    to_set = [v for pair in rel.set_fields.items() for v in pair]
    with client.pipeline(transaction=False) as pipe:
        for claim in orphans:
            item = _item_key(spec, claim)
            keys: list[bytes | str] = [spec.claimed_key, item, claim.heartbeat_key or item,
                                       rel.push_to if rel.push_to is not None else item]
            args = [claim.item_id, spec.claimed_type, spec.owner_field, claim.owner or b"", spec.claim_time_field,
                    claim.claim_time or b"", "1" if claim.heartbeat_key is not None else "0",
                    rel.push_end if rel.push_to is not None else "",
                    spec.pid_field or "", _seen(claim.pid), spec.host_field or "", _seen(claim.host),
                    len(deleted), *deleted, *to_set]
            script(keys=keys, args=args, client=pipe)
        results = pipe.execute(raise_on_error=False)
    outcomes = []
    for claim, result in zip(orphans, results, strict=True):
        if isinstance(result, Exception):
            outcomes.append((claim, f"error: {result}"))
        else:
            outcomes.append((claim, result.decode() if isinstance(result, bytes) else str(result)))
    return Released(tuple(outcomes))


def find_orphans(client: redis.Redis, spec: Claims, reader: ProcReader) -> ClaimsSeen:
    """Scan the claims now (blocking, within ``claims.timeout``), keeping the oldest
    ``release.max_per_repair`` orphaned ones. Raises ``ClaimsScanError``."""
    return scan_claims(client, spec, Liveness(reader), time.monotonic() + spec.timeout,
                       keep=spec.release.max_per_repair)


def orphaned_now(spec: Claims, base_dir: Path, reader: ProcReader) -> tuple[bool | None, str]:
    """The condition of ``CaretakerClaimsOrphaned`` (blocking): whether some claims are
    orphaned now, and what was seen; ``None`` when the claims could not be read."""
    try:
        with contextlib.closing(connect(spec, base_dir)) as client:
            seen = scan_claims(client, spec, Liveness(reader), time.monotonic() + spec.timeout)
    except ClaimsScanError as err:
        return None, f"claims could not be read ({err.reason}): {err.detail}"
    except ConfigError as err:
        return None, f"claims could not be read: {err}"
    return seen.orphaned > 0, seen.summary()


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:AUDIT_IDS])
    return shown + (f" and {len(items) - AUDIT_IDS} more" if len(items) > AUDIT_IDS else "")


def _release_now(spec: Claims, base_dir: Path, reader: ProcReader) -> tuple[ClaimsSeen, Released]:
    import redis.exceptions as errors  # noqa: PLC0415 - redis-py is loaded only where claims are configured

    try:
        with contextlib.closing(connect(spec, base_dir)) as client:
            seen = find_orphans(client, spec, reader)
            return seen, release(client, spec, seen.orphans)
    except ClaimsScanError as err:
        raise RepairFailed(f"claims could not be read ({err.reason}): {err.detail}") from err
    except (errors.RedisError, OSError, ConfigError) as err:
        raise RepairFailed(f"releasing claims failed: {type(err).__name__}: {err}") from err
    except Exception as err:  # the last resort: a failed repair with its reason, never a traceback in the executor
        log.exception("releasing claims failed unexpectedly")
        raise RepairFailed(f"releasing claims failed: unexpected {type(err).__name__}: {err}") from err


async def release_claims(ctx: ActionContext, name: str, step: StepLog) -> None:
    """Release the service's orphaned claims that are still orphaned (module docstring)."""
    spec = ctx.config.services[name].claims
    if spec is None:
        raise RepairFailed("the service has no claims block")
    seen, done = await asyncio.to_thread(_release_now, spec, ctx.config.base_dir, ctx.reader)
    step(f"read {seen.summary()}" + (f"; releasing the oldest {len(seen.orphans)}" if seen.orphans else ""),
         counts=seen.counts())
    if seen.invalid:
        step(f"{seen.invalid} invalid claims left alone (nothing proves them orphaned): "
             + _listed([f"{c.id_text} ({c.reason})" for c in seen.invalid_examples]))
    released = done.ids()
    if not seen.orphans:
        step("no orphaned claims: nothing to release")
    else:
        step(f"released {len(released)} claims" + (f": {_listed(released)}" if released else ""),
             released=released[:AUDIT_IDS], released_count=len(released))
    skipped = done.skipped()
    if skipped:
        step(f"not released {len(skipped)} claims: "
             + _listed([f"{c.id_text} ({WHY.get(o, o)})" for c, o in skipped]),
             skipped=[{"id": c.id_text, "why": WHY.get(o, o)} for c, o in skipped[:AUDIT_IDS]],
             skipped_count=len(skipped))
    left = seen.orphaned - len(seen.orphans)
    if left > 0:
        step(f"{left} more orphaned claims wait for the next attempt (release.max_per_repair is "
             f"{spec.release.max_per_repair})")
    failed = [WHY.get(o, o) for _, o in skipped if o.startswith("error") or o in FAILED]
    if failed:
        raise RepairFailed(f"{len(failed)} claims could not be released: {failed[0]}")


ACTIONS: dict[str, ActionFunc] = {"release_claims": release_claims}
