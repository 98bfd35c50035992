"""The receiver's durable state in SQLite: alert dedupe, the audit trail, budgets.

One connection, used from one thread (:class:`Store` methods are blocking; the app
calls them through a single-thread executor). WAL mode, so a crash loses at most
the transaction in flight. Times are Unix seconds (float).

Tables:

- ``alerts``: one row per ``(fingerprint, starts_at, status)`` ever received; the
  primary key is the dedupe rule (DESIGN.md: idempotent per fingerprint+startsAt).
- ``remediations``: the audit trail, one row per decision about a new alert.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AuditEntry", "NewAlert", "Store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    fingerprint TEXT NOT NULL,
    starts_at   TEXT NOT NULL,
    status      TEXT NOT NULL,
    first_seen  REAL NOT NULL,
    last_seen   REAL NOT NULL,
    times_seen  INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (fingerprint, starts_at, status)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS remediations (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at  REAL NOT NULL,
    fingerprint  TEXT NOT NULL,
    starts_at    TEXT NOT NULL,
    status       TEXT NOT NULL,
    alertname    TEXT NOT NULL,
    service_name TEXT NOT NULL,
    action       TEXT NOT NULL,
    decision     TEXT NOT NULL,   -- queued | acted | skipped | recorded
    reason       TEXT NOT NULL,   -- '' or one of payload.SKIP_REASONS
    state        TEXT NOT NULL,   -- queued | running | done | interrupted
    result       TEXT,            -- success | failure | NULL
    started_at   REAL,
    finished_at  REAL,
    steps        TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS remediations_service ON remediations (service_name, decision, started_at);
CREATE TABLE IF NOT EXISTS resets (
    service_name TEXT PRIMARY KEY,
    at           REAL NOT NULL,
    reason       TEXT NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class NewAlert:
    """An alert as the store needs it, with the decision already taken."""

    fingerprint: str
    starts_at: str
    status: str
    alertname: str
    service_name: str
    action: str
    decision: str
    reason: str


_AUDIT_COLUMNS = ("id", "received_at", "fingerprint", "starts_at", "status", "alertname", "service_name", "action",
                  "decision", "reason", "state", "result", "started_at", "finished_at", "steps")
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

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def as_json(self) -> dict[str, Any]:
        data = self.__dict__.copy()
        data["duration_seconds"] = self.duration_seconds
        return data


class Store:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def admit(self, alerts: Sequence[NewAlert], now: float) -> list[int | None]:
        """Record a notification's alerts in one transaction.

        Returns, per alert, the new audit entry's id, or ``None`` for an alert already
        seen (same fingerprint, startsAt and status), whose ``times_seen`` goes up.
        """
        return self.admit_many([alerts], now)[0]

    def admit_many(self, notifications: Sequence[Sequence[NewAlert]], now: float) -> list[list[int | None]]:
        """:meth:`admit` for several notifications in one transaction (group commit),
        in order, so a duplicate within the batch is seen as one."""
        out: list[list[int | None]] = []
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for alerts in notifications:
                    out.append(self._admit(cur, alerts, now))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return out

    @staticmethod
    def _admit(cur: sqlite3.Cursor, alerts: Sequence[NewAlert], now: float) -> list[int | None]:
        ids: list[int | None] = []
        for a in alerts:
            cur.execute(
                "INSERT INTO alerts (fingerprint, starts_at, status, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "times_seen = times_seen + 1, last_seen = excluded.last_seen "
                "RETURNING times_seen",
                (a.fingerprint, a.starts_at, a.status, now, now))
            (times_seen,) = cur.fetchone()
            if times_seen > 1:
                ids.append(None)
                continue
            cur.execute(
                "INSERT INTO remediations (received_at, fingerprint, starts_at, status, alertname, "
                "service_name, action, decision, reason, state) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (now, a.fingerprint, a.starts_at, a.status, a.alertname, a.service_name, a.action,
                 a.decision, a.reason, "queued" if a.decision == "queued" else "done"))
            ids.append(cur.lastrowid)
        return ids

    def update(self, entry_id: int, **fields: Any) -> None:
        """Set columns of one audit entry (``steps`` may be given as a list)."""
        if "steps" in fields:
            fields["steps"] = json.dumps(fields["steps"])
        allowed = {"decision", "reason", "state", "result", "started_at", "finished_at", "steps"}
        if not fields.keys() <= allowed:
            raise ValueError(f"cannot update {sorted(fields.keys() - allowed)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE remediations SET {assignments} WHERE id = ?",  # noqa: S608 - names checked
                             (*fields.values(), entry_id))

    def last_repair_finished(self, service_name: str) -> float | None:
        """When the newest finished repair of the service ended (for the cooldown)."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(finished_at) FROM remediations WHERE service_name = ? AND decision = 'acted'",
                (service_name,)).fetchone()
        return row[0] if row else None

    def repairs_since(self, service_name: str, since: float) -> int:
        """Repairs of the service started at or after ``since`` and after its last budget
        reset (for the attempt budget)."""
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM remediations WHERE service_name = ? AND decision = 'acted' AND started_at >= "
                "MAX(?, COALESCE((SELECT at FROM resets WHERE service_name = ?), 0))",
                (service_name, since, service_name)).fetchone()
        return int(n)

    def reset_budget(self, service_name: str, now: float, reason: str) -> None:
        """Forget the service's past repairs for its attempt budget (an operator, or health)."""
        with self._lock:
            self._db.execute("INSERT INTO resets (service_name, at, reason) VALUES (?, ?, ?) "
                             "ON CONFLICT DO UPDATE SET at = excluded.at, reason = excluded.reason",
                             (service_name, now, reason))

    def seen(self, fingerprint: str, starts_at: str, status: str) -> bool:
        """Whether this alert was admitted before (read-only, for plans)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM alerts WHERE fingerprint = ? AND starts_at = ? AND status = ?",
                                   (fingerprint, starts_at, status)).fetchone()
        return row is not None

    def mark_interrupted(self, now: float) -> list[AuditEntry]:
        """After a restart of the receiver: repairs left running become ``interrupted``,
        repairs left queued are skipped (``receiver_restarted``). Returns those entries."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            rows = cur.execute("SELECT id, state FROM remediations WHERE state IN ('queued', 'running')").fetchall()
            for entry_id, state in rows:
                if state == "running":
                    cur.execute("UPDATE remediations SET state = 'interrupted', result = 'failure', finished_at = ? "
                                "WHERE id = ?", (now, entry_id))
                else:
                    cur.execute("UPDATE remediations SET state = 'done', decision = 'skipped', "
                                "reason = 'receiver_restarted' WHERE id = ?", (entry_id,))
            cur.execute("COMMIT")
        return [e for e in (self.get(entry_id) for entry_id, _ in rows) if e is not None]

    def get(self, entry_id: int) -> AuditEntry | None:
        entries = self.list(limit=1, entry_id=entry_id)
        return entries[0] if entries else None

    def list(self, limit: int = 100, service_name: str | None = None, entry_id: int | None = None) -> list[AuditEntry]:
        """Audit entries, newest first."""
        where, args = [], []
        if service_name is not None:
            where.append("r.service_name = ?")
            args.append(service_name)
        if entry_id is not None:
            where.append("r.id = ?")
            args.append(str(entry_id))
        columns = ", ".join(f"r.{c}" for c in _AUDIT_COLUMNS)
        sql = (f"SELECT {columns}, COALESCE(a.times_seen, 1) FROM remediations r LEFT JOIN alerts a ON "  # noqa: S608
               "a.fingerprint = r.fingerprint AND a.starts_at = r.starts_at AND a.status = r.status"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.id DESC LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        entries = []
        for row in rows:
            fields = dict(zip(_AUDIT_COLUMNS, row, strict=False))
            fields["steps"] = json.loads(fields["steps"])
            entries.append(AuditEntry(**fields, times_seen=row[-1]))
        return entries
