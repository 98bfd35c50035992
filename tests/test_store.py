"""The receiver's state file: dedupe by batch, migration of older files, checkpoints."""

from __future__ import annotations

import errno
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import receiver.store
from receiver.store import SCHEMA_VERSION, NewAlert, Store
from receiver.vocabulary import AuditDecision, EntryState, ProblemState, Reason, RepairResult

# The layout written by receivers before schema version 2 (user_version 0): dedupe in
# its own table. Kept here verbatim to prove such a file is carried over intact.
SCHEMA_V1 = """
CREATE TABLE alerts (
    fingerprint TEXT NOT NULL, starts_at TEXT NOT NULL, status TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, times_seen INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (fingerprint, starts_at, status)
) WITHOUT ROWID;
CREATE TABLE remediations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL, status TEXT NOT NULL, alertname TEXT NOT NULL, service_name TEXT NOT NULL,
    action TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL, state TEXT NOT NULL, result TEXT,
    started_at REAL, finished_at REAL, steps TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX remediations_service ON remediations (service_name, decision, started_at);
CREATE TABLE resets (service_name TEXT PRIMARY KEY, at REAL NOT NULL, reason TEXT NOT NULL) WITHOUT ROWID;
"""


def new(fingerprint: str, status: str = "firing", decision: str = "queued") -> NewAlert:
    return NewAlert(fingerprint, "2026-11-22T03:00:00.000000+00:00", status, "CaretakerServiceDown", "svc",
                    "restart", decision, "" if decision == "queued" else "action_not_allowed")


def test_a_batch_dedupes_within_itself_and_against_the_past(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    try:
        (first,) = store.admit([new("a")], 1.0)
        assert first is not None
        batch = store.admit_many([[new("b"), new("a")], [new("b"), new("c"), new("a", status="resolved")]], 2.0)
        b, a_again = batch[0]
        b_again, c, a_resolved = batch[1]
        assert a_again is None and b_again is None  # seen before, and seen earlier in the same batch
        assert b is not None and c is not None and a_resolved is not None
        assert first < b < c < a_resolved  # ids in arrival order
        entries = {e.id: e for e in store.list()}
        assert len(entries) == 4
        assert entries[first].times_seen == 2 and entries[b].times_seen == 2 and entries[c].times_seen == 1
        assert entries[first].state == "queued" and entries[first].received_at == 1.0
        assert store.seen("a", "2026-11-22T03:00:00.000000+00:00", "firing")
        assert not store.seen("d", "2026-11-22T03:00:00.000000+00:00", "firing")
    finally:
        store.close()


def test_the_sql_speaks_the_audit_vocabulary() -> None:
    """The store's SQL spells decisions, states, results and reasons out (a partial
    index and the queries that use it must match as text): each is a vocabulary word."""
    source = Path(receiver.store.__file__).read_text(encoding="utf-8")
    words = set(re.findall(r"\b(?:state|decision|reason|result)\s*!?=\s*'([a-z_]*)'", source))
    vocabulary = {w.value for enum in (AuditDecision, EntryState, ProblemState, Reason, RepairResult) for w in enum}
    assert {"open", "queued", "running", "done", "acted", "skipped", "interrupted", "failure"} <= words
    assert words <= vocabulary, words - vocabulary


def test_a_failed_batch_records_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    try:
        store.admit([new("a")], 1.0)
        with pytest.raises(sqlite3.Error):
            store.admit_many([[new("b")], [new("c")], [new(None)]], 2.0)  # type: ignore[arg-type]  # NOT NULL
        assert [e.fingerprint for e in store.list()] == ["a"]
        assert store.admit([new("b")], 3.0) != [None]  # not half-recorded by the failed batch
    finally:
        store.close()


def test_a_version_1_state_file_is_migrated_intact(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO alerts VALUES ('f1', 't1', 'firing', 10.0, 50.0, 4)")
    db.execute("INSERT INTO alerts VALUES ('f2', 't2', 'resolved', 20.0, 20.0, 1)")
    db.execute("INSERT INTO remediations (id, received_at, fingerprint, starts_at, status, alertname, service_name, "
               "action, decision, reason, state, result, started_at, finished_at, steps) VALUES "
               "(7, 10.0, 'f1', 't1', 'firing', 'Down', 'svc', 'restart', 'acted', '', 'done', 'success', 11.0, "
               "14.0, '[{\"at\": 11.0, \"message\": \"SIGTERM\"}]')")
    db.execute("INSERT INTO remediations (id, received_at, fingerprint, starts_at, status, alertname, service_name, "
               "action, decision, reason, state) VALUES "
               "(9, 20.0, 'f2', 't2', 'resolved', 'Down', 'svc', 'restart', 'recorded', 'resolved', 'done')")
    db.execute("INSERT INTO resets VALUES ('svc', 12.0, 'operator')")
    db.commit()
    db.close()

    store = Store(path)
    try:
        old, older = store.list()
        assert (old.id, old.times_seen, old.reason, old.state) == (9, 1, "resolved", "done")
        assert (older.id, older.times_seen, older.result, older.duration_seconds) == (7, 4, "success", 3.0)
        assert older.steps == [{"at": 11.0, "message": "SIGTERM"}]
        assert store.repairs_since("svc", 0.0) == 0  # the reset at 12.0 came after its start at 11.0
        assert store.last_repair_finished("svc") == 14.0
        assert store.admit([NewAlert("f1", "t1", "firing", "Down", "svc", "restart", "queued", "")], 60.0) == [None]
        (fresh,) = store.admit([new("f3")], 61.0)
        assert fresh is not None and fresh > 9
    finally:
        store.close()
    db = sqlite3.connect(path)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "alerts" not in tables and "remediations_v1" not in tables
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()


def test_a_state_file_from_a_newer_receiver_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer than this receiver"):
        Store(path)


def rows_in_database_file(path: Path, scratch: Path) -> int:
    """Rows of ``remediations`` in the main database file alone, without its WAL: what
    checkpoints have copied there."""
    copy = scratch / "copy.sqlite"
    shutil.copyfile(path, copy)
    db = sqlite3.connect(copy)
    try:
        return int(db.execute("SELECT COUNT(*) FROM remediations").fetchone()[0])
    except sqlite3.OperationalError:  # the table itself is still only in the WAL
        return 0
    finally:
        db.close()
        copy.unlink()


def test_checkpoint_folds_the_wal_into_the_database_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    try:
        store.admit_many([[new(f"f{i}")] for i in range(500)], 1.0)
        assert rows_in_database_file(path, tmp_path) == 0  # commits stay in the WAL (no fsync on the loop)
        store.checkpoint()
        assert rows_in_database_file(path, tmp_path) == 500
        store.admit([new("late")], 2.0)
        store.checkpoint()
        assert rows_in_database_file(path, tmp_path) == 501
    finally:
        store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of the test's own, to fill; unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "caretaker-test", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"this platform does not let tests mount a tmpfs (root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        # --lazy: after a failed test its traceback may still hold an SQLite statement
        # (so a file) open; the mount then goes as soon as that is collected.
        subprocess.run(["umount", "--lazy", str(mount)], check=True, timeout=30)


def fill(filler: Path) -> Path:
    """Write ``filler`` until the disk says ENOSPC."""
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def test_a_full_disk_gives_up_the_reserve_to_record_alerts(small_disk: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    store = Store(small_disk / "s.sqlite", reserve_bytes=512 * 1024)
    try:
        assert store.hold_reserve()
        assert store.reserve_path.stat().st_blocks * 512 >= 512 * 1024  # allocated, not sparse
        filler = fill(small_disk / "filler")
        with pytest.raises(OSError, match="No space left"):
            (small_disk / "one-more").write_bytes(b"x" * 4096)
        # A batch that needs new pages in the WAL: written thanks to the reserve.
        ids = store.admit_many([[new(f"full{i}")] for i in range(200)], 1.0)
        assert all(entry_id is not None for (entry_id,) in ids)
        assert not store.reserve_path.exists()
        assert "released the 524288-byte reserve" in caplog.text
        assert store.update(ids[0][0], state="running") is None  # the repair can record its steps
        # With the reserve gone and the freed space filled again, the disk's answer shows.
        more = fill(small_disk / "filler2")
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            store.admit_many([[new(f"more{i}")] for i in range(200)], 2.0)
        assert len(store.list(limit=1000)) == 200  # the failed batch left nothing behind
        assert not store.hold_reserve()  # not taken while the disk is full
        filler.unlink()
        more.unlink()
        assert store.hold_reserve()  # taken again once there is room
    finally:
        store.close()
