"""The receiver's durable state in SQLite: alert dedupe, the audit trail, budgets.

One connection, used from one thread (:class:`Store` methods are blocking; the app
calls them through a single-thread executor). WAL mode, so a crash loses at most
the transaction in flight. Times are Unix seconds (float).

Tables (schema version 3, ``PRAGMA user_version``):

- ``remediations``: the audit trail. One row per ``(fingerprint, starts_at, status)``
  ever received (a unique index over the rows with no ``problem_id``: the dedupe rule,
  idempotent per fingerprint+startsAt), with the first decision about it and, for a
  repair, its steps. Resends only raise ``times_seen`` and ``last_seen``. Later
  decisions about the problem an alert opened (another attempt, a wait) are rows of
  their own with ``problem_id`` set. ``observation`` is what the receiver saw of the
  service when it decided (JSON).
- ``problems``: what the receiver works on (docs/design.md, "The repair model"). A firing
  alert that asks for a repair opens one (at most one open per fingerprint); resends
  refresh it; a resolved notification closes it; one not refreshed for
  ``receiver.problem_ttl`` expires.
- ``services``: per service, whether it is paused (and until when), the backoff step
  and the time of its next attempt, since when its budget is spent, and the processes
  of its last incarnation (``family``: ``[[pid, start_ticks], ...]``).
- ``resets``: when each service's attempt budget was last reset, and why.

A state file of version 1 or 2 is migrated in place, in one transaction, when it is
opened.

Decisions, states, results and reasons are the words of :mod:`receiver.vocabulary`.
The SQL here spells them out (a partial index and the statements that use it must
match as text); a test checks that each one it spells is a word of the vocabulary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from exporter.private import private_dir

from .vocabulary import AuditDecision, EntryState, Reason

__all__ = ["AuditEntry", "NewAlert", "Problem", "ServiceState", "Store"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bound once: admit_many() compares and writes these for every alert (see receiver.vocabulary).
_QUEUED, _DONE, _DUPLICATE = AuditDecision.QUEUED.value, EntryState.DONE.value, Reason.DUPLICATE.value

SCHEMA_VERSION = 3
TABLES_V3 = """
CREATE TABLE IF NOT EXISTS problems (
    id           INTEGER PRIMARY KEY,
    fingerprint  TEXT NOT NULL,
    starts_at    TEXT NOT NULL,
    service_name TEXT NOT NULL,
    alertname    TEXT NOT NULL,
    action       TEXT NOT NULL,
    labels       TEXT NOT NULL,   -- the alert's labels (JSON), for exec placeholders and observation
    entry_id     INTEGER,         -- the audit row of the alert that opened it, until a decision is written there
    state        TEXT NOT NULL,   -- vocabulary.ProblemState: open | closed | expired
    opened_at    REAL NOT NULL,
    last_seen    REAL NOT NULL,
    times_seen   INTEGER NOT NULL DEFAULT 1,
    closed_at    REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_decision TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS problems_open ON problems (fingerprint) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS problems_service ON problems (service_name) WHERE state = 'open';
CREATE TABLE IF NOT EXISTS services (
    service_name    TEXT PRIMARY KEY,
    paused          INTEGER NOT NULL DEFAULT 0,
    paused_until    REAL,            -- NULL: until resumed
    paused_reason   TEXT NOT NULL DEFAULT '',
    backoff_step    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    exhausted_since REAL,
    family          TEXT NOT NULL DEFAULT '[]',
    family_boot     TEXT NOT NULL DEFAULT '',  -- the boot the family was seen in: a pid means nothing after a reboot
    last_action     TEXT NOT NULL DEFAULT '',  -- the last attempt's action and result: a successful
    last_result     TEXT NOT NULL DEFAULT ''   -- repair does not hold back a different one (cooldown)
) WITHOUT ROWID;
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS remediations (
    id           INTEGER PRIMARY KEY,
    received_at  REAL NOT NULL,
    fingerprint  TEXT NOT NULL,
    starts_at    TEXT NOT NULL,
    status       TEXT NOT NULL,
    alertname    TEXT NOT NULL,
    service_name TEXT NOT NULL,
    action       TEXT NOT NULL,
    decision     TEXT NOT NULL,   -- vocabulary.AuditDecision: queued | acted | skipped | recorded
    reason       TEXT NOT NULL,   -- '' or a vocabulary.Reason
    state        TEXT NOT NULL,   -- vocabulary.EntryState: queued | running | done | interrupted
    result       TEXT,            -- vocabulary.RepairResult: success | failure | NULL
    started_at   REAL,
    finished_at  REAL,
    steps        TEXT NOT NULL DEFAULT '[]',
    times_seen   INTEGER NOT NULL DEFAULT 1,
    last_seen    REAL NOT NULL,
    problem_id   INTEGER,
    observation  TEXT NOT NULL DEFAULT 'null'
);
CREATE UNIQUE INDEX IF NOT EXISTS remediations_alert ON remediations (fingerprint, starts_at, status)
    WHERE problem_id IS NULL;
CREATE INDEX IF NOT EXISTS remediations_repairs ON remediations (service_name, started_at)
    WHERE decision = 'acted';
CREATE TABLE IF NOT EXISTS resets (
    service_name TEXT PRIMARY KEY,
    at           REAL NOT NULL,
    reason       TEXT NOT NULL
) WITHOUT ROWID;
""" + TABLES_V3

MIGRATE_FROM_2 = """
ALTER TABLE remediations ADD COLUMN problem_id INTEGER;
ALTER TABLE remediations ADD COLUMN observation TEXT NOT NULL DEFAULT 'null';
DROP INDEX remediations_alert;
CREATE UNIQUE INDEX remediations_alert ON remediations (fingerprint, starts_at, status) WHERE problem_id IS NULL;
""" + TABLES_V3

MIGRATE_FROM_1 = """
ALTER TABLE remediations RENAME TO remediations_v1;
DROP INDEX IF EXISTS remediations_service;
""" + SCHEMA + """
INSERT INTO remediations (id, received_at, fingerprint, starts_at, status, alertname, service_name, action,
                          decision, reason, state, result, started_at, finished_at, steps, times_seen, last_seen)
SELECT r.id, r.received_at, r.fingerprint, r.starts_at, r.status, r.alertname, r.service_name, r.action,
       r.decision, r.reason, r.state, r.result, r.started_at, r.finished_at, r.steps,
       COALESCE(a.times_seen, 1), COALESCE(a.last_seen, r.received_at)
FROM remediations_v1 r LEFT JOIN alerts a
  ON a.fingerprint = r.fingerprint AND a.starts_at = r.starts_at AND a.status = r.status;
DROP TABLE remediations_v1;
DROP TABLE alerts;
"""


class NewAlert(NamedTuple):
    """An alert as the store needs it, with the decision already taken (a named tuple:
    one is made per alert on the webhook's hot path)."""

    fingerprint: str
    starts_at: str
    status: str
    alertname: str
    service_name: str
    action: str
    decision: str
    reason: str
    labels: str = ""
    """The alert's labels as JSON, for an alert that opens a problem; else empty."""
    observation: str = "null"
    """JSON for the row's ``observation``, or ``null``: nothing. An aggregated row of alerts
    about another host or none (``~other_host``, ``~no_host``) keeps what the receiver is
    and which hosts its alerts named, ``{"receiver_host": ..., "fleet": ..., "hosts": [...]}``:
    a later one adds its hosts to the row's (at most 20)."""


_ADMIT = (
    "INSERT INTO remediations (received_at, fingerprint, starts_at, status, alertname, service_name, "
    "action, decision, reason, state, last_seen, observation) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (fingerprint, starts_at, status) WHERE problem_id IS NULL DO UPDATE SET "
    "times_seen = times_seen + 1, last_seen = excluded.last_seen, "
    # A resent row keeps its observation, unless the new one has some (NewAlert.observation):
    # then the new one, with the hosts of both.
    "observation = CASE WHEN excluded.observation = 'null' THEN remediations.observation "
    "WHEN remediations.observation = 'null' THEN excluded.observation "
    "ELSE json_set(excluded.observation, '$.hosts', json((SELECT json_group_array(value) FROM ("
    "SELECT value FROM json_each(remediations.observation, '$.hosts') UNION "
    "SELECT value FROM json_each(excluded.observation, '$.hosts') LIMIT 20)))) END")
_AUDIT_COLUMNS = ("id", "received_at", "fingerprint", "starts_at", "status", "alertname", "service_name", "action",
                  "decision", "reason", "state", "result", "started_at", "finished_at", "steps", "times_seen",
                  "problem_id", "observation")
_PROBLEM_COLUMNS = ("id", "fingerprint", "starts_at", "service_name", "alertname", "action", "labels", "entry_id",
                    "state", "opened_at", "last_seen", "times_seen", "closed_at", "attempts", "last_decision")
"""Columns of ``remediations`` (fixed names, the only text interpolated into SQL here)."""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    received_at: float
    fingerprint: str
    starts_at: str
    status: str
    alertname: str
    service_name: str
    action: str
    decision: str
    reason: str
    state: str
    result: str | None
    started_at: float | None
    finished_at: float | None
    steps: list[dict[str, Any]]
    times_seen: int
    problem_id: int | None = None
    observation: Any = None

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def as_json(self) -> dict[str, Any]:
        data = self.__dict__.copy()
        data["duration_seconds"] = self.duration_seconds
        return data


@dataclass(frozen=True)
class Problem:
    """A service's problem, opened by a firing alert (times in Unix seconds)."""

    id: int
    fingerprint: str
    starts_at: str
    service_name: str
    alertname: str
    action: str
    labels: dict[str, str]
    entry_id: int | None
    state: str
    opened_at: float
    last_seen: float
    times_seen: int
    closed_at: float | None
    attempts: int
    last_decision: str

    def as_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class ServiceState:
    """What the receiver keeps about one service between repairs."""

    paused: bool = False
    paused_until: float | None = None
    paused_reason: str = ""
    backoff_step: int = 0
    next_attempt_at: float = 0.0
    exhausted_since: float | None = None
    family: tuple[tuple[int, int], ...] = ()
    family_boot: str = ""
    last_action: str = ""
    last_result: str = ""

    def paused_at(self, now: float) -> bool:
        return self.paused and (self.paused_until is None or now < self.paused_until)


class Store:
    """The state file: one writer connection and one reader connection.

    Writes (:meth:`admit_many`, :meth:`update`, :meth:`reset_budget`,
    :meth:`mark_interrupted`) are short transactions that end in a commit without an
    fsync (WAL, ``synchronous=NORMAL``): durable against a crash of the receiver, not of
    the machine. They are cheap enough to run on the event loop, which the webhook
    does, so a notification is committed before it is answered without a thread
    hand-off per request. Reads (:meth:`list`, :meth:`seen`, :meth:`repairs_since`,
    :meth:`last_repair_finished`) and :meth:`checkpoint` (which fsyncs) use the second
    connection and may run on another thread, the store's own (:meth:`off_loop`); in
    WAL mode they neither block nor wait for the writer. Only if :meth:`checkpoint`
    falls far behind (the WAL reaches ``WAL_AUTOCHECKPOINT_PAGES``) does a commit
    checkpoint, and fsync, by itself.

    With ``reserve_bytes``, the store holds that much disk in ``<state file>.reserve``
    (:meth:`hold_reserve`). A write that finds the disk full gives it up and is tried
    once more: the alert that asks to clean a full disk is still recorded and repaired.

    Raises ``sqlite3.Error`` (for instance "database or disk is full") from any method.
    """

    WRITER_BUSY_TIMEOUT_MS = 200
    """How long a write waits for a lock held by another process (say an operator's
    sqlite3 shell) before failing, short because writes run on the event loop."""
    WAL_AUTOCHECKPOINT_PAGES = 10_000
    """Bound on the WAL (about 40 MiB) should :meth:`checkpoint` not keep up."""

    def __init__(self, path: str | Path, reserve_bytes: int = 0) -> None:
        self.path = Path(path)
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self.reserve_bytes = reserve_bytes
        """Disk space held back in :attr:`reserve_path` for when the disk fills (0: none);
        see :meth:`hold_reserve`."""
        private_dir(self.path.parent)
        # Created 0600 before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        self._db.execute(f"PRAGMA busy_timeout={self.WRITER_BUSY_TIMEOUT_MS}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={self.WAL_AUTOCHECKPOINT_PAGES}")
        self._db.execute("PRAGMA journal_size_limit=67108864")
        self._reader = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA busy_timeout=5000")
        self._read_lock = threading.Lock()
        self._written = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caretaker-store")

    def _migrate(self) -> None:
        """Create the schema, or bring a version 1 state file to version 2 (one transaction)."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"state file has schema version {version}, newer than this receiver's "
                                        f"{SCHEMA_VERSION}: upgrade the receiver or move the file aside")
        old = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alerts'").fetchone()
        script = MIGRATE_FROM_1 if old else MIGRATE_FROM_2 if version == 2 else SCHEMA
        # executescript() would commit on its own; run it inside an explicit transaction.
        self._db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")

    async def off_loop(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``func(*args, **kwargs)`` (a read of this store, or :meth:`checkpoint`) on the
        store's own thread, so that the event loop does not wait for it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: func(*args, **kwargs))

    def close(self) -> None:
        """Wait for the calls handed to :meth:`off_loop`, then close both connections."""
        self._thread.shutdown(wait=True)
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    def _transaction(self, body: Callable[[sqlite3.Cursor], T]) -> T:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                result = body(cur)
                cur.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled it back already (SQLITE_FULL)
                    cur.execute("ROLLBACK")
                raise
            self._written = True
        return result

    def _write(self, body: Callable[[sqlite3.Cursor], T]) -> T:
        """Run ``body`` in one write transaction on the writer connection: committed at
        the end, rolled back whole on any error. When the disk is full and the reserve
        is held, the reserve is released and the transaction tried once more, so the
        receiver can still record the alert that asks to clean that disk."""
        try:
            return self._transaction(body)
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode != sqlite3.SQLITE_FULL or not self.release_reserve():
                raise
            log.error("the disk holding %s is full: released the %d-byte reserve %s so that alerts and repairs "
                      "can still be recorded; it is made again once there is room", self.path,
                      self.reserve_bytes, self.reserve_path)
            return self._transaction(body)

    # --- the reserve: disk space held back for a full disk ---------------------------------------
    def hold_reserve(self) -> bool:
        """Make sure the reserve file holds ``reserve_bytes`` of disk (allocated, not
        sparse), unless that would leave less than as much again free. Blocking: call
        it from a thread. Returns whether the reserve is held."""
        if self.reserve_bytes <= 0:
            return False
        with contextlib.suppress(FileNotFoundError):
            if self.reserve_path.stat().st_blocks * 512 >= self.reserve_bytes:
                return True
        fs = os.statvfs(self.reserve_path.parent)
        if fs.f_bavail * fs.f_frsize < 2 * self.reserve_bytes:
            return False
        fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.reserve_bytes)
        except OSError:
            self.release_reserve()
            return False
        finally:
            os.close(fd)
        return True

    def release_reserve(self) -> bool:
        """Delete the reserve file; whether there was one."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        return True

    def checkpoint(self) -> None:
        """Copy committed pages from the WAL into the database file (PASSIVE: never waits
        for, nor blocks, the writer). Blocking (it fsyncs); call it from a thread."""
        if not self._written:
            return
        self._written = False
        with self._read_lock:
            self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def admit(self, alerts: Sequence[NewAlert], now: float) -> list[int | None]:
        """Record a notification's alerts in one transaction.

        Returns, per alert, the new audit entry's id, or ``None`` for an alert already
        seen (same fingerprint, startsAt and status), whose ``times_seen`` goes up.
        """
        return self.admit_many([alerts], now)[0]

    def admit_many(self, notifications: Sequence[Sequence[NewAlert]], now: float) -> list[list[int | None]]:
        """:meth:`admit` for several notifications in one transaction (group commit),
        in order, so a duplicate within the batch is seen as one.

        One ``executemany`` upsert for the whole batch; the new rows are then the ones
        with an id above the largest before it (a rowid table without AUTOINCREMENT
        gives a new row the largest id plus one, and no other writer can interleave in
        an IMMEDIATE transaction).
        """
        rows = [(now, a.fingerprint, a.starts_at, a.status, a.alertname, a.service_name, a.action, a.decision,
                 a.reason, _QUEUED if a.decision == _QUEUED else _DONE, now, a.observation)
                for alerts in notifications for a in alerts]

        def upsert(cur: sqlite3.Cursor) -> dict[tuple[str, str, str], int]:
            (last,) = cur.execute("SELECT COALESCE(MAX(id), 0) FROM remediations").fetchone()
            cur.executemany(_ADMIT, rows)
            new = {(fingerprint, starts_at, status): entry_id for entry_id, fingerprint, starts_at, status in
                   cur.execute("SELECT id, fingerprint, starts_at, status FROM remediations WHERE id > ?", (last,))}
            self._problems(cur, notifications, new, now)
            return new

        new = self._write(upsert)
        # pop: the first of two equal alerts in one batch is the new one, the second a duplicate
        return [[new.pop((a.fingerprint, a.starts_at, a.status), None) for a in alerts] for alerts in notifications]

    @staticmethod
    def _problems(cur: sqlite3.Cursor, notifications: Sequence[Sequence[NewAlert]],
                  new: dict[tuple[str, str, str], int], now: float) -> None:
        """Open or refresh a problem for each firing alert that asks for a repair (new or
        a resend), close the open problem of each resolved alert."""
        opening, refreshing, closing = [], [], []
        for alerts in notifications:
            for a in alerts:
                if a.decision == _QUEUED:  # a new alert that asks for a repair, or its resend
                    opening.append((a.fingerprint, a.starts_at, a.service_name, a.alertname, a.action,
                                    a.labels or "{}", new.get((a.fingerprint, a.starts_at, a.status)), now, now))
                elif a.reason == _DUPLICATE and a.labels:  # owned by another receiver: refresh only
                    refreshing.append((now, a.starts_at, a.fingerprint))
                elif a.status == "resolved" and a.service_name:
                    # Only the incident it is about: a late resolved notification of an
                    # earlier incident does not close the current one.
                    closing.append((now, a.fingerprint, a.starts_at))
        if opening:
            cur.executemany(
                "INSERT INTO problems (fingerprint, starts_at, service_name, alertname, action, labels, entry_id, "
                "state, opened_at, last_seen) VALUES (?,?,?,?,?,?,?,'open',?,?) "
                "ON CONFLICT (fingerprint) WHERE state = 'open' DO UPDATE SET times_seen = times_seen + 1, "
                "last_seen = excluded.last_seen, starts_at = excluded.starts_at", opening)
        if refreshing:
            cur.executemany("UPDATE problems SET times_seen = times_seen + 1, last_seen = ?, starts_at = ? "
                            "WHERE fingerprint = ? AND state = 'open'", refreshing)
        if closing:
            cur.executemany("UPDATE problems SET state = 'closed', closed_at = ? "
                            "WHERE fingerprint = ? AND starts_at = ? AND state = 'open'", closing)

    # --- problems and per-service state ----------------------------------------------------------
    def open_problems(self, service_name: str | None = None) -> list[Problem]:
        """Open problems (of one service, or all), oldest first."""
        return self.problems(service_name, open_only=True, limit=10_000)

    def problems(self, service_name: str | None = None, open_only: bool = False, limit: int = 100) -> list[Problem]:
        """Problems, open ones first then the newest closed ones (``open_only``: only those)."""
        where, args = [], []
        if service_name is not None:
            where.append("service_name = ?")
            args.append(service_name)
        if open_only:
            where.append("state = 'open'")
        sql = (f"SELECT {', '.join(_PROBLEM_COLUMNS)} FROM problems"  # noqa: S608 - fixed names
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY state = 'open' DESC, CASE WHEN state = 'open' THEN id ELSE -id END LIMIT ?")
        with self._read_lock:
            rows = self._reader.execute(sql, (*args, limit)).fetchall()
        out = []
        for row in rows:
            fields = dict(zip(_PROBLEM_COLUMNS, row, strict=True))
            fields["labels"] = json.loads(fields["labels"])
            out.append(Problem(**fields))
        return out

    def close_problem(self, problem_id: int, state: str, now: float) -> None:
        """Close an open problem as ``state``, a :class:`~receiver.vocabulary.ProblemState`
        (``closed`` or ``expired``)."""
        self._write(lambda cur: cur.execute("UPDATE problems SET state = ?, closed_at = ? WHERE id = ? AND "
                                            "state = 'open'", (state, now, problem_id)))

    def record(self, problem: Problem, now: float, decision: str, reason: str, observation: Any,
               action: str = "", state: str = EntryState.DONE, attempt: bool = False) -> int:
        """Write a decision about a problem into the audit trail, and remember it on the
        problem. The first decision goes into the row of the alert that opened the
        problem; later ones are rows of their own. ``decision``, ``reason`` and ``state``
        are :mod:`~receiver.vocabulary` values; ``attempt`` counts an attempt on the
        problem. Returns the audit entry's id."""
        seen = json.dumps(observation)

        def write(cur: sqlite3.Cursor) -> int:
            row = cur.execute("SELECT p.entry_id FROM problems p JOIN remediations r ON r.id = p.entry_id "
                              "WHERE p.id = ? AND r.state = 'queued'", (problem.id,)).fetchone()
            entry_id = row[0] if row else None
            if entry_id is not None:
                cur.execute("UPDATE remediations SET decision = ?, reason = ?, state = ?, observation = ?, "
                            "action = ? WHERE id = ?", (decision, reason, state, seen, action or problem.action,
                                                        entry_id))
            else:
                cur.execute(
                    "INSERT INTO remediations (received_at, fingerprint, starts_at, status, alertname, service_name, "
                    "action, decision, reason, state, last_seen, problem_id, observation) "
                    "VALUES (?,?,?,'firing',?,?,?,?,?,?,?,?,?)",
                    (now, problem.fingerprint, problem.starts_at, problem.alertname, problem.service_name,
                     action or problem.action, decision, reason, state, now, problem.id, seen))
                entry_id = int(cur.lastrowid or 0)
            cur.execute("UPDATE problems SET entry_id = NULL, last_decision = ?, attempts = attempts + ? "
                        "WHERE id = ?", (reason or decision, int(attempt), problem.id))
            return entry_id

        return self._write(write)

    def service_state(self, service_name: str) -> ServiceState:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT paused, paused_until, paused_reason, backoff_step, next_attempt_at, exhausted_since, family, "
                "family_boot, last_action, last_result FROM services WHERE service_name = ?",
                (service_name,)).fetchone()
        if row is None:
            return ServiceState()
        paused, until, reason, step, next_at, exhausted, family, boot, last_action, last_result = row
        return ServiceState(bool(paused), until, reason, step, next_at, exhausted,
                            tuple((int(pid), int(ticks)) for pid, ticks in json.loads(family)), boot, last_action,
                            last_result)

    def set_service_state(self, service_name: str, **fields: Any) -> None:
        """Set fields of a service's :class:`ServiceState` (``family`` as pairs)."""
        allowed = {"paused", "paused_until", "paused_reason", "backoff_step", "next_attempt_at", "exhausted_since",
                   "family", "family_boot", "last_action", "last_result"}
        if not fields.keys() <= allowed:
            raise ValueError(f"cannot set {sorted(fields.keys() - allowed)}")
        if "family" in fields:
            fields["family"] = json.dumps([list(pair) for pair in fields["family"]])
        if "paused" in fields:
            fields["paused"] = int(fields["paused"])
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields)
        self._write(lambda cur: cur.execute(
            f"INSERT INTO services (service_name, {names}) VALUES (?, {marks}) "  # noqa: S608 - fixed names
            f"ON CONFLICT (service_name) DO UPDATE SET {updates}", (service_name, *fields.values())))

    PRUNE_BATCH = 2000
    """Rows deleted per transaction when pruning: each is short, so a webhook commit on
    the event loop never waits long for the writer lock."""

    def prune(self, now: float, max_age: float, max_entries: int, keep_repairs_since: float) -> int:
        """Delete audit entries older than ``max_age`` seconds or beyond the newest
        ``max_entries``, and problems closed before ``max_age``; never the entry of an
        open problem, nor a repair started at or after ``keep_repairs_since`` (the
        budget counts those). Blocking: call it from a thread. Returns rows deleted."""
        keep = ("state = 'done' AND id NOT IN (SELECT entry_id FROM problems WHERE state = 'open' AND entry_id IS "
                "NOT NULL) AND NOT (decision = 'acted' AND COALESCE(started_at, 0) >= ?)")
        with self._read_lock:
            row = self._reader.execute("SELECT id FROM remediations ORDER BY id DESC LIMIT 1 OFFSET ?",
                                       (max_entries,)).fetchone()
        beyond = row[0] if row else 0
        deleted = 0
        while True:
            n = self._write(lambda cur: cur.execute(
                f"DELETE FROM remediations WHERE id IN (SELECT id FROM remediations WHERE (received_at < ? OR id <= ?) "  # noqa: S608
                f"AND {keep} ORDER BY id LIMIT ?)", (now - max_age, beyond, keep_repairs_since, self.PRUNE_BATCH)
            ).rowcount)
            deleted += n
            if n < self.PRUNE_BATCH:
                break
        deleted += self._write(lambda cur: cur.execute(
            "DELETE FROM problems WHERE state != 'open' AND closed_at < ?", (now - max_age,)).rowcount)
        return deleted

    def update(self, entry_id: int, **fields: Any) -> None:
        """Set columns of one audit entry (``steps`` may be given as a list)."""
        if "steps" in fields:
            fields["steps"] = json.dumps(fields["steps"])
        if "observation" in fields:
            fields["observation"] = json.dumps(fields["observation"])
        allowed = {"decision", "reason", "state", "result", "started_at", "finished_at", "steps", "observation"}
        if not fields.keys() <= allowed:
            raise ValueError(f"cannot update {sorted(fields.keys() - allowed)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self._write(lambda cur: cur.execute(f"UPDATE remediations SET {assignments} WHERE id = ?",  # noqa: S608
                                            (*fields.values(), entry_id)))

    def last_repair_finished(self, service_name: str) -> float | None:
        """When the newest finished repair of the service ended, as the audit trail says
        (None: none). The cooldown itself is the schedule's ``next_attempt_at``."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT MAX(finished_at) FROM remediations WHERE service_name = ? AND decision = 'acted'",
                (service_name,)).fetchone()
        return row[0] if row else None

    def repairs_since(self, service_name: str, since: float) -> int:
        """Repairs of the service started at or after ``since`` and after its last budget
        reset (for the attempt budget)."""
        with self._read_lock:
            (n,) = self._reader.execute(
                "SELECT COUNT(*) FROM remediations WHERE service_name = ? AND decision = 'acted' AND started_at >= "
                "MAX(?, COALESCE((SELECT at FROM resets WHERE service_name = ?), 0))",
                (service_name, since, service_name)).fetchone()
        return int(n)

    def reset_budget(self, service_name: str, now: float, reason: str) -> None:
        """Forget the service's past repairs for its attempt budget (an operator, or health)."""
        self._write(lambda cur: cur.execute("INSERT INTO resets (service_name, at, reason) VALUES (?, ?, ?) "
                                            "ON CONFLICT DO UPDATE SET at = excluded.at, reason = excluded.reason",
                                            (service_name, now, reason)))

    def seen(self, fingerprint: str, starts_at: str, status: str) -> bool:
        """Whether this alert was admitted before (read-only, for plans)."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT 1 FROM remediations WHERE fingerprint = ? AND starts_at = ? AND status = ? "
                "AND problem_id IS NULL",
                (fingerprint, starts_at, status)).fetchone()
        return row is not None

    def mark_interrupted(self, now: float) -> list[AuditEntry]:
        """After a restart of the receiver: repairs left running become ``interrupted``;
        queued rows whose problem is no longer open are skipped (``receiver_restarted``).
        Open problems stay open: they are worked on again. Returns those entries."""

        def mark(cur: sqlite3.Cursor) -> list[tuple[int, str]]:
            # A queued row whose problem is still open gets its decision when the problem is worked on.
            rows = cur.execute("SELECT id, state FROM remediations WHERE state = 'running' OR (state = 'queued' AND "
                               "id NOT IN (SELECT entry_id FROM problems WHERE state = 'open' AND entry_id IS NOT "
                               "NULL))").fetchall()
            for entry_id, state in rows:
                if state == EntryState.RUNNING:
                    cur.execute("UPDATE remediations SET state = 'interrupted', result = 'failure', finished_at = ? "
                                "WHERE id = ?", (now, entry_id))
                else:
                    cur.execute("UPDATE remediations SET state = 'done', decision = 'skipped', "
                                "reason = 'receiver_restarted' WHERE id = ?", (entry_id,))
            return rows

        rows = self._write(mark)
        return [e for e in (self.get(entry_id) for entry_id, _ in rows) if e is not None]

    def get(self, entry_id: int) -> AuditEntry | None:
        entries = self.list(limit=1, entry_id=entry_id)
        return entries[0] if entries else None

    def list(self, limit: int = 100, service_name: str | None = None, entry_id: int | None = None) -> list[AuditEntry]:
        """Audit entries, newest first."""
        where, args = [], []
        if service_name is not None:
            where.append("service_name = ?")
            args.append(service_name)
        if entry_id is not None:
            where.append("id = ?")
            args.append(str(entry_id))
        sql = (f"SELECT {', '.join(_AUDIT_COLUMNS)} FROM remediations"  # noqa: S608 - fixed names
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?")
        with self._read_lock:
            rows = self._reader.execute(sql, (*args, limit)).fetchall()
        entries = []
        for row in rows:
            fields = dict(zip(_AUDIT_COLUMNS, row, strict=True))
            fields["steps"] = json.loads(fields["steps"])
            fields["observation"] = json.loads(fields["observation"])
            entries.append(AuditEntry(**fields))
        return entries
