"""Work claims in Redis: which are held by a live owner, which are orphaned.

A worker that takes a job from Redis marks it claimed (``services.<name>.claims``
says where: the set of claimed ids, each item's hash and its owner, pid, host and
claim time fields, the owner's heartbeat key). :func:`scan_claims` reads every claim
and judges it:

- **orphaned** when the owner's heartbeat key is gone *and* its process is not alive
  on this host: the pid does not run, or runs a process that started after the claim
  (a reused pid; start times from ``/proc/PID/stat``, known to about a second; the claim
  time read as ``claim_time_zone`` says, :func:`plausible_claim_time`). An
  owner on another host is judged by its heartbeat alone. With ``max_age``, an older
  claim is orphaned whatever its owner says;
- **active** otherwise (the heartbeat is there, or the owner runs);
- **invalid** when a field the verdict needs cannot be used: the item's hash is gone
  (``no_item``), its key is not a hash (``wrong_type``), it has no owner (``no_owner``),
  its claim time does not parse or is not plausible (before 2001, or more than
  :data:`CLAIM_TIME_SKEW` in the future: a unit or zone mix-up)
  (``bad_claim_time``), or its pid does not parse and the pid is what decides
  (``bad_pid``); a claim whose judging raised anything is ``unreadable`` (logged). Invalid
  claims are counted, never released: nothing proves them orphaned.

The scan uses ``SSCAN``/``ZSCAN`` (never ``KEYS``) in batches of :data:`SCAN_BATCH`
ids, each batch one pipelined round of ``HMGET`` (an item of the wrong type is its own
answer, not the batch's failure), then ``/proc`` (the running pids listed once per scan,
then once per distinct pid that may be an owner: :class:`Liveness`), then ``EXISTS`` for
the heartbeat keys of the claims whose owner is not alive here
(a live owner decides alone; each key is asked once per scan): one ``EXISTS`` of them
all, and one per key, pipelined, only when some exist and some do not.
It is blocking (run it in a thread) and bounded by a deadline. redis-py is imported
when the first client is made, so an exporter without ``claims`` never loads it.

The exporter renders :class:`ClaimsSeen` (:class:`~exporter.metrics.ClaimsCollector`);
the receiver scans again before it releases anything (``receiver/claims.py``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .config import Claims, ConfigError, read_secret
from .config.types import resolve_path
from .procfs import PIDFILE_SLACK_SECONDS, ProcessInfo, ProcReader

if TYPE_CHECKING:
    import redis

__all__ = ["SCAN_BATCH", "SCAN_ERROR_REASONS", "STATES", "Claim", "ClaimsScanError", "ClaimsSeen", "ClaimsWatch",
           "Liveness", "claim_time_readings", "connect", "parse_claim_time", "plausible_claim_time", "scan_claims",
           "this_host"]

log = logging.getLogger(__name__)

STATES = ("active", "orphaned", "invalid")
"""The ``state`` label of ``caretaker_claims``."""
SCAN_ERROR_REASONS = ("timeout", "connection", "auth", "error")
"""Why a scan failed (``caretaker_claims_scan_errors_total{reason}``): it ran out of
time, Redis could not be reached, refused the credentials, or answered with an error
(``WRONGTYPE``: ``claimed_key`` is not a set)."""
SCAN_BATCH = 500
"""Ids asked for per ``SSCAN``/``ZSCAN`` call (its ``COUNT`` hint) and pipelined together."""
INVALID_EXAMPLES = 10
"""Invalid claims kept (the first found), to show which they are."""
MAX_PID = 1 << 22
"""Above Linux's largest ``pid_max`` (2^22)."""
MAX_PID_DIGITS = len(str(MAX_PID))


def this_host() -> str:
    """The name a claim's host field must hold for its owner to be judged on this host:
    the host name, as the client writes it (``socket.gethostname()``)."""
    return socket.gethostname()


EARLIEST_CLAIM_TIME = 978_307_200.0
"""2001-01-01T00:00:00Z: a claim time before it is a unit mix-up (seconds read as
milliseconds give 1970), never a claim."""
CLAIM_TIME_SKEW = 300.0
"""Seconds a claim time may lie in the future (clocks of the worker's host and this one
differ); later is a unit or zone mix-up (milliseconds read as seconds, a local time
read as UTC east of Greenwich)."""


def claim_time_readings(raw: bytes | None, fmt: str, zone: str = "utc") -> tuple[float, ...]:
    """The Unix times (seconds) a claim time field may mean: none when it does not parse,
    one, or two for an ISO 8601 time without an offset when ``zone`` is ``either`` (UTC
    and this host's local time, as ``datetime.utcnow()`` and ``datetime.now()`` write
    them: the caller picks one). Nothing here checks that a time is plausible.

    ``iso8601``: what :meth:`datetime.fromisoformat` reads (``2026-12-02T13:02:04.123Z``,
    ``+01:00``: exact whatever ``zone`` says; without an offset, read in ``zone``:
    ``utc``, ``local`` or ``either``); ``epoch_seconds``, ``epoch_ms``: a number."""
    if raw is None:
        return ()
    try:
        text = raw.decode("ascii").strip()
        if fmt == "iso8601":
            when = datetime.fromisoformat(text)
            if when.tzinfo is not None:
                values: tuple[float, ...] = (when.timestamp(),)
            else:
                as_utc, as_local = when.replace(tzinfo=UTC).timestamp(), when.timestamp()  # naive: local time
                values = {"utc": (as_utc,), "local": (as_local,)}.get(zone, (as_utc, as_local))
        else:
            values = (float(text) / (1000.0 if fmt == "epoch_ms" else 1.0),)
    except (UnicodeDecodeError, ValueError, OverflowError, OSError):
        return ()
    return tuple(v for v in values if math.isfinite(v) and v > 0)


def parse_claim_time(raw: bytes | None, fmt: str, zone: str = "utc") -> float | None:
    """Unix seconds from a claim time field; ``None`` when missing or not in ``fmt``
    (:func:`claim_time_readings`; of two readings, the later)."""
    return max(claim_time_readings(raw, fmt, zone), default=None)


def plausible_claim_time(readings: tuple[float, ...], now: float) -> float:
    """The latest of ``readings`` between :data:`EARLIEST_CLAIM_TIME` and ``now`` plus
    :data:`CLAIM_TIME_SKEW`; 0 when none is. Of a naive time's two readings, one is
    right and the other is off by this host's UTC offset: the later plausible one is
    taken, which never makes a claim look older than it is (so neither ``max_age`` nor a
    pid that started after the claim can release live work for a zone mix-up); at worst
    a claim older than the offset looks younger by it."""
    return max((t for t in readings if EARLIEST_CLAIM_TIME <= t <= now + CLAIM_TIME_SKEW), default=0.0)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class Claim:
    """One claim as judged by one scan. Raw values are the bytes Redis holds, so a
    release can check that they have not changed."""

    item_id: bytes
    state: Literal["active", "orphaned", "invalid"]
    reason: str
    """Why: ``heartbeat``, ``owner_alive``, ``remote_owner``, ``within_max_age`` (active);
    ``owner_dead``, ``pid_reused``, ``heartbeat_absent``, ``max_age`` (orphaned);
    ``no_item``, ``no_owner``, ``wrong_type``, ``bad_claim_time``, ``bad_pid``, ``unreadable`` (invalid)."""
    owner: bytes | None = None
    claim_time: bytes | None = None
    claimed_at: float = 0.0
    """Unix seconds; 0 when unknown."""
    heartbeat_key: bytes | None = None
    """The heartbeat key found absent, when the verdict rests on it (a release checks it
    is still absent); ``None`` otherwise."""
    pid: bytes | None = None
    host: bytes | None = None
    """The pid and host fields as read (``None``: absent, or not configured): the verdict
    rested on them, so a release checks they have not changed."""

    @property
    def id_text(self) -> str:
        return _text(self.item_id)

    def describe(self) -> str:
        """``17 (owner_dead, owner w-1, claimed 2026-12-02T13:02:04Z)``, for the audit trail."""
        owner = f", owner {_text(self.owner)}" if self.owner is not None else ""
        when = (f", claimed {datetime.fromtimestamp(self.claimed_at, UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
                if self.claimed_at else "")
        return f"{self.id_text} ({self.reason}{owner}{when})"


@dataclass(frozen=True)
class ClaimsSeen:
    """What one scan of a service's claims found."""

    active: int = 0
    orphaned: int = 0
    invalid: int = 0
    oldest_orphan: float = 0.0
    """Claim time of the oldest orphaned claim, Unix seconds; 0 when there is none."""
    orphans: tuple[Claim, ...] = ()
    """The oldest orphaned claims, oldest first, as many as the scan was asked to keep."""
    invalid_examples: tuple[Claim, ...] = ()
    """The first invalid claims found (at most :data:`INVALID_EXAMPLES`)."""
    duration_seconds: float = 0.0
    scanned_at: float = 0.0
    """Unix time the scan finished; 0 for the view that stands before the first scan."""

    def counts(self) -> dict[str, int]:
        """Claims by state (every state of :data:`STATES` a key)."""
        return {"active": self.active, "orphaned": self.orphaned, "invalid": self.invalid}

    def summary(self) -> str:
        return (f"{self.orphaned + self.active + self.invalid} claims: {self.orphaned} orphaned, "
                f"{self.active} active, {self.invalid} invalid")


class ClaimsScanError(Exception):
    """A scan that did not finish; ``reason`` is one of :data:`SCAN_ERROR_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Liveness:
    """Whether a claim's owner process runs on this host: its pid runs a process that
    started before the claim (within :data:`~exporter.procfs.PIDFILE_SLACK_SECONDS`).
    ``/proc`` is read once per pid for the life of the object: make one per scan.

    The pids that run are listed once (``/proc``'s directory, on the first look), so a pid
    that was not running then is not looked up when its claim is older than the listing
    (less the slack): whatever runs under that pid now started after the claim, so the
    claim's owner is dead either way. That saves a failed ``open`` per dead owner, the
    cost of a scan of many orphans. A claim made since is looked up as before."""

    def __init__(self, reader: ProcReader | None = None, host: str | None = None) -> None:
        self.reader = reader or ProcReader()
        self.host = this_host() if host is None else host
        self._seen: dict[int, ProcessInfo | None] = {}
        self._running: frozenset[int] | None = None
        self._listed_at = 0.0

    def is_local(self, host: str) -> bool:
        """An empty host field means this host."""
        return not host or host == self.host

    def _ran_before(self, pid: int, claimed_at: float) -> bool:
        """False when ``pid`` certainly did not run a process that started before the claim."""
        if self._running is None:
            self._listed_at = time.time()
            try:
                self._running = frozenset(int(n) for n in os.listdir(self.reader.root) if n.isdigit())
            except OSError:
                self._running = frozenset()
                self._listed_at = 0.0  # no listing: every pid is looked up
        return pid in self._running or claimed_at + PIDFILE_SLACK_SECONDS >= self._listed_at

    def owner(self, pid: int, claimed_at: float) -> Literal["alive", "dead", "reused"]:
        if pid not in self._seen:
            if not self._ran_before(pid, claimed_at):
                return "dead"  # not cached: a later claim of this pid may be newer than the listing
            self._seen[pid] = self.reader.stat(pid)  # None: gone, a zombie, or a kernel thread
        info = self._seen[pid]
        if info is None:
            return "dead"
        return "alive" if info.start_time_seconds <= claimed_at + PIDFILE_SLACK_SECONDS else "reused"


@dataclass(slots=True)
class _Read:
    """A claim's fields as read, before its owner is looked up."""

    item_id: bytes
    owner: bytes | None
    claim_time: bytes | None
    claimed_at: float
    pid: bytes | None
    host: bytes | None
    """As Redis holds it (``None``: no such field, or none configured: this host)."""
    invalid: str
    """Why it cannot be judged (``no_item``...); empty when it can."""
    expired: bool
    """Older than ``max_age``."""
    heartbeat_key: bytes | None
    """Its heartbeat key, for a claim that is neither invalid nor expired."""


def _key(pattern: bytes, item_id: bytes, owner: bytes | None) -> bytes:
    key = pattern.replace(b"{id}", item_id)
    return key.replace(b"{owner}", owner) if owner is not None else key


def _read(spec: Claims, heartbeat_pattern: bytes | None, item_id: bytes, values: list[bytes | None],
          now: float) -> _Read:
    owner, claim_time = values[0], values[1]
    pid = values[2] if spec.pid_field is not None else None
    host = values[-1] if spec.host_field is not None else None
    claimed_at = plausible_claim_time(claim_time_readings(claim_time, spec.claim_time_format, spec.claim_time_zone),
                                      now)
    invalid = ("no_item" if values.count(None) == len(values) else "no_owner" if not owner
               else "bad_claim_time" if not claimed_at else "")
    expired = spec.max_age is not None and not invalid and now - claimed_at > spec.max_age
    heartbeat = None
    if heartbeat_pattern is not None and not invalid and not expired:
        heartbeat = _key(heartbeat_pattern, item_id, owner)
    return _Read(item_id, owner, claim_time, claimed_at, pid, host, invalid, expired, heartbeat)


def _pid(raw: bytes | None) -> int | None:
    """The pid in a pid field, ``None`` unless it is 2 to :data:`MAX_PID` in ASCII digits.
    The length is bounded before ``int()``, which refuses more than 4,300 digits."""
    text = (raw or b"").strip()
    if not 0 < len(text) <= MAX_PID_DIGITS or not text.isdigit():  # bytes.isdigit(): ASCII 0-9 only
        return None
    pid = int(text)
    return pid if 1 < pid < MAX_PID else None


Owner = Literal["alive", "dead", "reused", "remote", "bad_pid", "unknown"]
"""What this host says of a claim's owner: its process is ``alive``, ``dead`` or its pid
``reused``; it is on another host (``remote``, not looked up); its pid does not parse;
or there is no pid field (``unknown``)."""


def owner_of(spec: Claims, read: _Read, liveness: Liveness) -> Owner:
    if not liveness.is_local(_text(read.host or b"")):
        return "remote"
    if spec.pid_field is None:
        return "unknown"
    pid = _pid(read.pid)
    return "bad_pid" if pid is None else liveness.owner(pid, read.claimed_at)


_ORPHANED_BECAUSE = {"dead": "owner_dead", "reused": "pid_reused", "remote": "heartbeat_absent",
                     "unknown": "heartbeat_absent"}


Verdict = tuple[Literal["active", "orphaned", "invalid"], str, bool]
"""``(state, reason, the heartbeat's absence is part of it)``."""


def judge(read: _Read, owner: Owner | None, beating: bool | None) -> Verdict:
    """The verdict on one claim (module docstring). ``owner``: :func:`owner_of` (``None``
    for an invalid or expired claim); ``beating``: whether its heartbeat key exists,
    ``None`` when it was not looked up (there is none, or the owner is alive)."""
    if read.invalid:
        return "invalid", read.invalid, False
    if read.expired:
        return "orphaned", "max_age", False
    if owner == "alive":
        return "active", "owner_alive", False
    if beating:
        return "active", "heartbeat", False
    if owner == "bad_pid":
        return "invalid", "bad_pid", False
    if owner in ("dead", "reused") or (beating is False and owner is not None):
        return "orphaned", _ORPHANED_BECAUSE[owner or "unknown"], beating is False
    return "active", "remote_owner" if owner == "remote" else "within_max_age", False


class _Tally:
    """Counts, the oldest ``keep`` orphans (a bounded heap), the first invalid claims. A
    :class:`Claim` is made only for what is kept."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.counts = {"active": 0, "orphaned": 0, "invalid": 0}
        self.oldest = 0.0
        self.heap: list[tuple[float, int, Claim]] = []  # (-claimed_at, n, claim): the newest on top
        self.invalid: list[Claim] = []
        self._n = itertools.count()

    def add(self, read: _Read, verdict: Verdict) -> None:
        state = verdict[0]
        self.counts[state] += 1
        if state == "active":
            return
        if state == "invalid":
            if len(self.invalid) < INVALID_EXAMPLES:
                self.invalid.append(_claim(read, verdict))
            return
        self.oldest = read.claimed_at if not self.oldest else min(self.oldest, read.claimed_at)
        if self.keep and (len(self.heap) < self.keep or read.claimed_at < -self.heap[0][0]):
            entry = (-read.claimed_at, next(self._n), _claim(read, verdict))
            if len(self.heap) < self.keep:
                heapq.heappush(self.heap, entry)
            else:
                heapq.heapreplace(self.heap, entry)

    def seen(self, duration: float) -> ClaimsSeen:
        orphans = tuple(c for _, _, c in sorted(self.heap, key=lambda e: (-e[0], e[1])))
        return ClaimsSeen(self.counts["active"], self.counts["orphaned"], self.counts["invalid"], self.oldest,
                          orphans, tuple(self.invalid), duration, time.time())


def _claim(read: _Read, verdict: Verdict) -> Claim:
    state, reason, checked = verdict
    return Claim(read.item_id, state, reason, read.owner, read.claim_time, read.claimed_at,
                 read.heartbeat_key if checked else None, read.pid, read.host)


def scan_claims(client: redis.Redis, spec: Claims, liveness: Liveness, deadline: float, keep: int = 0) -> ClaimsSeen:
    """Read and judge every claim (blocking) before ``deadline`` (``time.monotonic()``).

    ``keep``: how many orphaned claims to return (the oldest); 0 for counts only.
    Raises :class:`ClaimsScanError` when Redis fails or the deadline passes; an id the
    scan meets twice (``SSCAN`` may return one twice) is counted once.
    """
    import redis.exceptions as errors  # noqa: PLC0415 - redis-py is loaded only where claims are configured

    try:
        return _scan(client, spec, liveness, deadline, keep)
    except errors.TimeoutError as err:
        raise ClaimsScanError("timeout", f"Redis did not answer in time: {err}") from err
    except (errors.AuthenticationError, errors.AuthenticationWrongNumberOfArgsError,
            errors.NoPermissionError) as err:
        raise ClaimsScanError("auth", f"{type(err).__name__}: {err}") from err
    except errors.ConnectionError as err:
        raise ClaimsScanError("connection", str(err)) from err
    except errors.ResponseError as err:
        auth = "NOAUTH" in str(err) or "WRONGPASS" in str(err) or "NOPERM" in str(err)
        raise ClaimsScanError("auth" if auth else "error", str(err)) from err
    except (errors.RedisError, OSError) as err:
        raise ClaimsScanError("error", f"{type(err).__name__}: {err}") from err
    except ClaimsScanError:
        raise
    except Exception as err:  # the last resort: a scan never fails the scrape, nor the repair, with a traceback
        log.exception("claims scan failed unexpectedly")
        raise ClaimsScanError("error", f"unexpected {type(err).__name__}: {err}") from err


def _scan(client: redis.Redis, spec: Claims, liveness: Liveness, deadline: float, keep: int) -> ClaimsSeen:
    started = time.monotonic()
    now = time.time()
    fields = list(spec.claim_fields)
    item_pattern = spec.item_key.encode()
    heartbeat_pattern = spec.heartbeat_key.encode() if spec.heartbeat_key is not None else None
    tally = _Tally(keep)
    faults = _Faults()
    seen: set[bytes] = set()
    beating: dict[bytes, bool] = {}
    cursor = 0
    while True:
        if time.monotonic() > deadline:
            raise ClaimsScanError("timeout", f"the scan did not finish in time ({len(seen)} claims read)")
        if spec.claimed_type == "zset":
            cursor, pairs = client.zscan(spec.claimed_key, cursor, count=SCAN_BATCH)
            batch: Sequence[object] = [member for member, _score in pairs]
        else:
            cursor, batch = client.sscan(spec.claimed_key, cursor, count=SCAN_BATCH)
        # The client does not decode (decode_responses=False): ids are bytes, kept exact.
        ids = [i for i in dict.fromkeys(batch) if isinstance(i, bytes) and i not in seen]
        seen.update(ids)
        if ids:
            with client.pipeline(transaction=False) as pipe:
                for item_id in ids:
                    pipe.hmget(_key(item_pattern, item_id, None), fields)
                rows = pipe.execute(raise_on_error=False)  # an item of the wrong type is its own answer
            looked = [_look(spec, heartbeat_pattern, item_id, row, now, liveness, faults)
                      for item_id, row in zip(ids, rows, strict=True)]
            # A live owner decides alone: its heartbeat is looked up only when it is not alive here.
            asked = [r.heartbeat_key if r.heartbeat_key is not None and owner != "alive" else None
                     for r, owner in looked]
            unknown = list(dict.fromkeys(k for k in asked if k is not None and k not in beating))
            if unknown:
                beating.update(zip(unknown, _exist(client, unknown), strict=True))
            for (r, owner), heartbeat in zip(looked, asked, strict=True):
                tally.add(r, judge(r, owner, beating[heartbeat] if heartbeat is not None else None))
        if int(cursor) == 0:
            break
    if faults.count > 1:
        log.warning("%d claims could not be judged in this scan (counted as invalid, unreadable)", faults.count)
    return tally.seen(time.monotonic() - started)


class _Faults:
    """Claims whose judging raised: each is ``invalid`` (``unreadable``); the first of a
    scan is logged with its traceback, the others counted in one line at the end."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, item_id: bytes, err: Exception) -> None:
        self.count += 1
        if self.count == 1:
            log.warning("claim %s could not be judged, counted as invalid (unreadable): %s: %s", _text(item_id)[:200],
                        type(err).__name__, err, exc_info=err)


def _look(spec: Claims, heartbeat_pattern: bytes | None, item_id: bytes, row: object, now: float,
          liveness: Liveness, faults: _Faults) -> tuple[_Read, Owner | None]:
    """One claim's fields and what this host says of its owner (``None`` for a claim
    that is invalid or expired). Whatever its fields hold, one claim never fails the
    scan: a claim whose judging raises is invalid (``unreadable``)."""
    if isinstance(row, Exception):
        if "WRONGTYPE" not in str(row):
            raise row  # NOPERM, OOM...: the scan fails with its reason
        return _Read(item_id, None, None, 0.0, None, None, "wrong_type", False, None), None
    try:
        if not isinstance(row, list):
            raise TypeError(f"HMGET answered {type(row).__name__}")
        read = _read(spec, heartbeat_pattern, item_id, row, now)
        return read, None if read.invalid or read.expired else owner_of(spec, read, liveness)
    except Exception as err:  # a hostile or unforeseen value makes this claim invalid, not the scan fail
        faults.add(item_id, err)
        return _Read(item_id, None, None, 0.0, None, None, "unreadable", False, None), None


def _exist(client: redis.Redis, keys: list[bytes]) -> list[bool]:
    """Whether each key exists. One ``EXISTS`` of them all (a count) settles a batch where
    none or all do (the usual case: the heartbeats of dead owners are all gone); a mixed
    batch asks each key, pipelined."""
    count = int(client.exists(*keys))
    if count in (0, len(keys)):
        return [bool(count)] * len(keys)
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        return [bool(n) for n in pipe.execute()]


def connect(spec: Claims, base_dir: Path) -> redis.Redis:
    """A redis-py client for ``spec`` (imports redis-py). Commands time out after
    ``spec.timeout`` and are not retried. Raises ``ConfigError`` for an unreadable secret."""
    import redis  # noqa: PLC0415 - redis-py is loaded only where claims are configured
    from redis.backoff import NoBackoff  # noqa: PLC0415
    from redis.retry import Retry  # noqa: PLC0415

    return redis.Redis(host=spec.host, port=spec.port, db=spec.db, username=spec.username,
                       password=read_secret(spec.password, base_dir) if spec.password is not None else None,
                       ssl=spec.tls, ssl_ca_certs=str(resolve_path(base_dir, spec.ca_file)) if spec.ca_file else None,
                       socket_timeout=spec.timeout, socket_connect_timeout=spec.timeout,
                       retry=Retry(NoBackoff(), 0))


class ClaimsWatch:
    """One service's claims as the exporter shows them: the last scan that finished
    (:attr:`seen`; all 0 before the first) and scan errors by reason (:attr:`errors`).
    A failed scan leaves the last view in place, as a timed-out process scan does."""

    def __init__(self, service: str, spec: Claims, base_dir: Path, reader: ProcReader | None = None) -> None:
        self.service = service
        self.spec = spec
        self.base_dir = base_dir
        self.reader = reader or ProcReader()
        self.seen = ClaimsSeen()
        self.errors: Counter[str] = Counter(dict.fromkeys(SCAN_ERROR_REASONS, 0))
        self._client: redis.Redis | None = None

    def scan(self, scrape_deadline: float) -> ClaimsSeen:
        """Scan (blocking) within ``claims.timeout``. Never raises: a failure is counted and
        logged, and the last view is returned. A scan that ends after ``scrape_deadline``
        (``time.monotonic()``) still replaces the view, for the next scrape, and is counted
        as a ``timeout``: the scrape that asked for it showed the view before."""
        try:
            if self._client is None:
                self._client = connect(self.spec, self.base_dir)
            self.seen = scan_claims(self._client, self.spec, Liveness(self.reader),
                                    time.monotonic() + self.spec.timeout)
            if time.monotonic() > scrape_deadline:
                self.failed("timeout", f"the scan took {self.seen.duration_seconds:.2f}s, more than the scrape "
                                       "allowed; the next scrape shows it")
        except ClaimsScanError as err:
            self.failed(err.reason, err.detail)
            if err.reason in ("connection", "auth"):
                self.close()  # the next scan connects again (and reads the secret again)
        except ConfigError as err:
            self.failed("auth", str(err))
        except Exception as err:  # the last resort: never a failed scrape for every service
            log.exception("claims of %s: scan failed unexpectedly", self.service)
            self.failed("error", f"unexpected {type(err).__name__}: {err}")
        return self.seen

    def failed(self, reason: str, detail: str) -> None:
        self.errors[reason] += 1
        log.warning("claims of %s: scan failed (%s): %s", self.service, reason, detail)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
