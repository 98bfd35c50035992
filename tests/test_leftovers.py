"""Leftovers of a dead incarnation are stopped before a restart (receiver/family.py).

A service's main process can die (SIGKILL, OOM killer) while what it started lives
on in sessions of its own: PostgreSQL backends call ``setsid()``, so neither the
postmaster's process group nor its session finds them, and while one of them still
runs a query it holds the shared memory, and every new postmaster refuses to start
("pre-existing shared memory block is still in use"). The receiver remembers each
service's family (its processes, their descendants and session members) and stops
what is left of it before it starts the service again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from exporter.procfs import ProcReader, scan_services
from receiver.app import EXECUTOR_KEY

from .helpers import (
    PG_NO_SYNC,
    MakeConfig,
    alert,
    audit,
    free_port,
    post_alerts,
    postgres_bin,
    require_binary,
    settle,
    wait_for,
    wait_until,
)

LEFTOVERS = "leftover processes of the previous incarnation"

# --- processes, by pid and start time (never by name) ---------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start_ticks)`` of a process from /proc/PID/stat; None once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def running(pid: int, ticks: int) -> bool:
    """The very process (same start time) still runs; a zombie has ended."""
    seen = proc_stat(pid)
    return seen is not None and seen[1] == ticks and seen[0] not in "ZX"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def signal_if(pid: int, check: Callable[[int], bool], sig: signal.Signals = signal.SIGKILL) -> bool:
    """Signal pid if ``check(pid)`` holds, through a pidfd (so a reused pid is never hit)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not check(pid):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def kill_exact(pid: int, ticks: int) -> None:
    """SIGKILL the process (pid, start time) if it still runs."""
    signal_if(pid, lambda p: running(p, ticks))


def reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


# --- the receiver -------------------------------------------------------------------------


def family(client: Any, service: str) -> frozenset[tuple[int, int]]:
    """What the receiver's tracker knows of the service's family: (pid, start ticks)."""
    return frozenset(client.server.app[EXECUTOR_KEY].ctx.family.families.get(service, ()))


def pids(members: frozenset[tuple[int, int]]) -> set[int]:
    return {pid for pid, _ in members}


async def finished_repair(client: Any, timeout: float) -> dict[str, Any]:
    """The first repair the receiver finished (an ``acted`` audit entry that is done)."""
    entries: list[dict[str, Any]] = []

    async def done() -> list[dict[str, Any]]:
        nonlocal entries
        entries = await audit(client)
        return [e for e in entries if e["decision"] == "acted" and e["state"] == "done"]

    try:
        return dict((await wait_until(done, timeout, interval=0.1, what="a repair to finish"))[-1])
    except AssertionError as err:
        raise AssertionError(f"no repair finished within {timeout}s: {entries}") from err


async def repair_of_a_dead(client: Any, service: str, fingerprint: str,
                           timeout: float) -> tuple[dict[str, Any], float, list[str]]:
    """Alert that ``service`` is down: the repair that follows, the seconds it took from
    the alert, and its messages."""
    alerted = time.monotonic()
    await post_alerts(client, alert(fingerprint, service_name=service, remediation="restart"))
    entry = await finished_repair(client, timeout)
    return entry, time.monotonic() - alerted, messages(entry)


def messages(entry: dict[str, Any]) -> list[str]:
    return [str(s["message"]) for s in entry["steps"]]


def leftover_step(entry: dict[str, Any]) -> dict[str, Any]:
    found = [s for s in entry["steps"] if LEFTOVERS in s["message"]]
    assert found, f"the repair stopped no leftovers: {messages(entry)}"
    return dict(found[0])


async def leave_alone(client: Any, service: str) -> None:
    """No more repairs of the service (the test is over): pause it, let a repair in flight end."""
    await client.server.app[EXECUTOR_KEY].pause(service, None, "the test is over")
    with contextlib.suppress(AssertionError):
        await settle(client, 60)


TRACK_INTERVAL = 0.2
"""receiver.track_interval: the family (children started a moment ago) is known quickly."""


# --- a service whose child lives in a session of its own (no PostgreSQL needed) ------------

PARENT = """\
import os, sys, time
child = os.fork()
if child == 0:
    os.setsid()  # its own session and group, as a PostgreSQL backend: the parent's group does not hold it
    # a new title (as a backend's), so the service's match does not select it
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", sys.argv[1]])
with open(sys.argv[2], "a") as f:
    f.write(f"{child}\\n")
while True:
    time.sleep(1)
"""


@pytest.mark.timeout(90)
async def test_a_child_in_its_own_session_that_outlived_its_killed_parent_is_stopped_before_the_restart(
        receiver_for: Any, make_config: MakeConfig, tmp_path: Path) -> None:
    marker, child_marker = f"parent-{uuid.uuid4().hex}", f"child-{uuid.uuid4().hex}"
    children = tmp_path / "children"
    argv = [sys.executable, "-c", PARENT, child_marker, str(children), marker]
    config = make_config(service={
        "match": {"cmdline": f"{marker}$"},
        "processes": {"min": 1, "max": 1},
        "start": {"argv": argv, "log_file": "svc.log"},
        "stop": {"grace_period": 3},
        "remediation": {"allow": ["restart"], "verify_timeout": 10}}, token=True, track_interval=TRACK_INTERVAL)

    def child_pids() -> list[int]:
        return [int(line) for line in children.read_text().split()] if children.exists() else []

    def ours(pid: int) -> bool:
        return cmdline(pid).endswith(child_marker + " ")

    # The previous incarnation, started by someone else (so the receiver learns its family by looking).
    first = subprocess.Popen(argv, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"{marker}-bystander"],
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    client = None
    try:
        await wait_until(lambda: child_pids() and ours(child_pids()[0]), 10, what="the first child")
        (child,) = child_pids()
        seen = proc_stat(child)
        assert seen is not None
        child_ticks = seen[1]
        client = await receiver_for(config)
        await wait_until(lambda: {first.pid, child} <= pids(family(client, "svc")), 10,
                         what="the receiver to know the child as part of the service's family")

        first.send_signal(signal.SIGKILL)  # the parent alone, not its group
        await asyncio.to_thread(first.wait, 10)
        await asyncio.sleep(0.5)  # a few more scans of the tracker: the dead incarnation's family is kept
        assert running(child, child_ticks), "the child should have outlived its parent"
        known = family(client, "svc")
        assert (child, child_ticks) in known

        entry, took, log = await repair_of_a_dead(client, "svc", "leftovers1", 30)
        assert entry["result"] == "success", log
        step = leftover_step(entry)
        assert step["message"] == f"stopping 1 {LEFTOVERS}", log
        assert [p["pid"] for p in step["processes"]] == [child]
        assert any(m.startswith(f"SIGTERM to pid {child} ") for m in log), log
        assert not any("SIGKILL" in m for m in log), log  # it obeyed SIGTERM within the grace period
        assert not running(child, child_ticks), "the leftover child still runs"
        assert bystander.poll() is None, "a process outside the service's family was stopped"

        (new,) = scan_services(ProcReader(), config.services, (os.getpid(),), with_fds=False)["svc"]
        assert new.pid != first.pid
        assert log.index(step["message"]) < next(i for i, m in enumerate(log) if m.startswith("started "))
        assert log[-1].startswith("verified: 1 processes"), log
        assert took < 15, f"the repair took {took:.1f}s"
    finally:
        if client is not None:
            await leave_alone(client, "svc")
        for pid in child_pids():  # the first child if it survived, and the new incarnation's
            signal_if(pid, ours)
        await asyncio.to_thread(reap, first)
        await asyncio.to_thread(reap, bystander)


# --- real PostgreSQL, started as its own user ------------------------------------------------

CPU_QUERY = "SELECT count(*) FROM (SELECT generate_series(1, 10000000000)) AS s"
"""A query that keeps its backend busy. Not ``pg_sleep``: a backend that waits (on its
latch, a lock, or the client) notices at once that its postmaster died and exits; one
that computes only notices the signals it is sent, and holds the shared memory."""


@dataclass
class Cluster:
    """A throwaway cluster (SCRAM on 127.0.0.1); ``argv`` starts its postmaster as postgres."""

    root: Path
    port: int
    password: str
    argv: list[str]
    known: list[tuple[int, int]] = field(default_factory=list)
    """Processes to be sure to stop at the end: (pid, start ticks)."""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def pidfile(self) -> Path:
        return self.data / "postmaster.pid"

    def postmaster(self) -> int | None:
        """The pid of the running postmaster of this data directory, if one runs."""
        try:
            first = self.pidfile.read_text().split("\n", 1)[0].strip()
        except OSError:
            return None
        if not first.isdigit():
            return None
        pid = int(first)
        seen = proc_stat(pid)
        return pid if seen is not None and seen[0] not in "ZX" and self.is_postmaster(pid) else None

    def is_postmaster(self, pid: int) -> bool:
        return f" -D {self.data} " in cmdline(pid)

    def start(self, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    async def connect(self, timeout: float = 30.0, **kwargs: Any) -> Any:
        """A connection, retried while the server starts (or recovers from a crash)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres",
                                             database="postgres", password=self.password, ssl=False, timeout=5,
                                             **kwargs)
            except (OSError, TimeoutError, asyncpg.PostgresError) as err:
                if time.monotonic() > deadline:
                    raise AssertionError(f"cannot connect to postgres on {self.port}: {err}") from err
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown of whatever postmaster runs on the data directory, then SIGKILL
        for every process the test noted; by pid, never by name."""
        pid = self.postmaster()
        if pid is not None and signal_if(pid, self.is_postmaster, signal.SIGINT):
            deadline = time.monotonic() + 30
            while self.postmaster() == pid and time.monotonic() < deadline:
                time.sleep(0.1)
            signal_if(pid, self.is_postmaster, signal.SIGKILL)
        for known_pid, ticks in self.known:
            kill_exact(known_pid, ticks)
        for proc in self.procs:
            reap(proc)


@pytest.fixture
def pg_cluster() -> Iterator[Cluster]:
    initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
    as_postgres = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as its own user
        as_postgres = [require_binary("setpriv"), "--reuid=postgres", "--regid=postgres", "--init-groups"]
    root = Path(tempfile.mkdtemp(prefix="caretaker-leftovers-"))  # pytest's tmp dirs are 0700: not for postgres
    os.chmod(root, 0o755)
    port = free_port()
    # setpriv execs the postmaster: the process the receiver starts is the postmaster itself.
    cluster = Cluster(root, port, f"pw-{uuid.uuid4().hex}",
                      [*as_postgres, postgres, "-D", str(root / "data"), "-p", str(port),
                       "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}", *PG_NO_SYNC])
    try:
        pwfile = root / "pw"
        pwfile.write_text(cluster.password + "\n")
        pwfile.chmod(0o600)
        if as_postgres:
            shutil.chown(root, "postgres")
            shutil.chown(pwfile, "postgres")
        subprocess.run([*as_postgres, initdb, "-D", str(cluster.data), "-U", "postgres", "--auth=scram-sha-256",
                        f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(180)
async def test_a_sigkilled_postmaster_with_a_live_backend_is_healed(receiver_for: Any, pg_cluster: Cluster,
                                                                    make_config: MakeConfig, tmp_path: Path) -> None:
    cluster = pg_cluster
    (tmp_path / "pgpass").write_text(cluster.password)
    config = make_config({"pg": {
        "match": {"pidfile": str(cluster.pidfile)},  # the postmaster only, never a backend
        "processes": {"min": 1, "max": 1},
        "probes": [{"name": "sql", "type": "postgres", "port": cluster.port, "password": {"file": "pgpass"},
                    "tls": "disable", "timeout": 2}],
        # PostgreSQL refuses to run as root: the receiver starts it as its own user.
        "start": {"argv": cluster.argv[cluster.argv.index(postgres_bin("postgres")):], "log_file": "postgres.log",
                  **({"user": "postgres"} if os.geteuid() == 0 else {})},
        "stop": {"grace_period": 5},
        "remediation": {"allow": ["restart"], "verify_timeout": 30}}}, token=True, track_interval=TRACK_INTERVAL)

    first = cluster.start(tmp_path / "postgres.log")  # the previous incarnation, started as the receiver would
    busy = await cluster.connect(server_settings={"statement_timeout": "60s"})  # bounds the query in any case
    query: asyncio.Task[Any] | None = None
    client = None
    try:
        assert cluster.postmaster() == first.pid, "setpriv should exec the postmaster"
        backend = int(await busy.fetchval("SELECT pg_backend_pid()"))
        seen = proc_stat(backend)
        assert seen is not None
        backend_ticks = seen[1]
        cluster.known.append((backend, backend_ticks))
        client = await receiver_for(config)
        await wait_until(lambda: {first.pid, backend} <= pids(family(client, "pg")), 15,
                         what="the receiver to know the backend as part of postgres's family")
        assert len(scan_services(ProcReader(), config.services, (os.getpid(),), with_fds=False)["pg"]) == 1

        query = asyncio.create_task(busy.fetchval(CPU_QUERY))
        await wait_until(lambda: " SELECT" in cmdline(backend), 10, what="the backend to run the query")
        os.kill(first.pid, signal.SIGKILL)  # the postmaster alone, not its group
        await asyncio.to_thread(first.wait, 10)  # reaped, as its parent would: no zombie holds the pid
        await asyncio.sleep(0.5)  # a few more scans of the tracker: the dead incarnation's family is kept
        assert running(backend, backend_ticks), "the backend should have outlived its postmaster"
        assert cluster.postmaster() is None
        known = family(client, "pg")
        assert (backend, backend_ticks) in known

        entry, took, log = await repair_of_a_dead(client, "pg", "pgdown1", 60)
        assert entry["result"] == "success", log
        assert log[0] == "no processes running", log

        step = leftover_step(entry)
        stopped_pids = {p["pid"] for p in step["processes"]}
        assert backend in stopped_pids, step
        assert stopped_pids <= pids(known), "only members of the service's family may be stopped"
        assert any(m.startswith(f"SIGTERM to pid {backend} ") for m in log), log
        assert not running(backend, backend_ticks), "the old backend still runs"

        started = [m for m in log if m.startswith("started ")]
        assert len(started) == 1, log
        assert log.index(step["message"]) < log.index(started[0])
        new = cluster.postmaster()
        assert new is not None and new != first.pid
        if os.geteuid() == 0:  # restarted by argv as its own user, not as root
            uid_line = next(x for x in Path(f"/proc/{new}/status").read_text().splitlines() if x.startswith("Uid:"))
            assert uid_line.split()[1:] == [str(pwd.getpwnam("postgres").pw_uid)] * 4
        assert started[0].endswith(f" as pid {new}"), (started, new)  # the started process is the postmaster
        assert log[-1] == "verified: 1 processes, probes passing: sql", log
        conn = await cluster.connect(10)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        assert took < 30, f"the repair took {took:.1f}s"
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await query  # its backend was stopped
    finally:
        busy.terminate()
        if query is not None:
            await asyncio.gather(query, return_exceptions=True)
        if client is not None:
            await leave_alone(client, "pg")
            cluster.known.extend(family(client, "pg"))  # the new incarnation: stopped with the cluster


def test_a_process_of_another_service_is_never_a_leftover(children: Any, make_config: MakeConfig) -> None:
    """A's process started B's (a launcher): when A dies, B's process is B's, not A's leftover."""
    from receiver.family import FamilyTracker

    a_mark, b_mark = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    launcher = ("import subprocess, sys, time\n"
                "subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)', sys.argv[1]])\n"
                "while True: time.sleep(1)\n")
    config = make_config({"a": {"match": {"cmdline": f"{a_mark}$"}}, "b": {"match": {"cmdline": f"{b_mark}$"}}})
    parent = children.start([sys.executable, "-c", launcher, b_mark, a_mark])
    tracker = FamilyTracker(ProcReader(), config.services)
    wait_for(lambda: (tracker.scan(), len(tracker.families.get("a", ())) == 2)[1], 10,
             what="A's family to hold its child")
    (b_pid,) = [pid for pid, _ in tracker.families["a"] if pid != parent.pid]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    tracker.scan()
    assert tracker.leftovers("a") == []  # B's process, though A started it
    assert b_pid in {pid for pid, _ in tracker.matched["b"]}
    os.kill(b_pid, signal.SIGKILL)
