"""Shared fixtures: free ports, a fake /proc tree, real binaries, child processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.procfs import ProcReader, scan_services
from receiver.process import send_signal

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def require_binary(*names: str) -> str:
    """Path of the first program found; under CI a missing one fails the test (never skips)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' or '.join(names)} not installed (Debian packages; `make test` installs them)"
    pytest.fail(message) if IN_CI else pytest.skip(message)  # under CI a missing binary fails, never skips


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Children:
    """Processes a test started; each in its own group, stopped by group at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
            proc.wait(10)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    c.stop_all()


@pytest.fixture
def python() -> str:
    return sys.executable


# --- a fake /proc tree --------------------------------------------------------------

CLK_TCK = 100
PAGE = 4096
BTIME = 1_700_000_000


class FakeProc:
    """A /proc tree on disk: ``add(pid, comm=..., cmdline=[...])`` writes a process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "stat").write_text(f"cpu  1 2 3 4\nbtime {BTIME}\n")

    def add(self, pid: int, comm: str = "proc", cmdline: list[str] | None = None, state: str = "S",
            ppid: int = 1, pgid: int | None = None, start_ticks: int = 1000, utime: int = 0, stime: int = 0,
            rss_pages: int = 0, flags: int = 0, exe: str | None = None, fds: int = 0, threads: int = 1) -> None:
        # Like the kernel, a new process gets a new /proc/PID inode: build it beside the old one.
        final = self.root / str(pid)
        d = self.root / f".new-{pid}"
        d.mkdir()
        fields = [state, ppid, pgid if pgid is not None else pid, pid, 0, -1, flags, 0, 0, 0, 0, utime, stime,
                  0, 0, 20, 0, threads, 0, start_ticks, 0, rss_pages] + [0] * 30
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + "\n")
        argv = cmdline if cmdline is not None else [comm]
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        if exe is not None:
            (d / "exe").symlink_to(exe)
        (d / "fd").mkdir()
        for i in range(fds):
            (d / "fd" / str(i)).write_text("")
        if final.exists():
            shutil.rmtree(final)
        d.rename(final)

    def set_cmdline(self, pid: int, argv: list[str]) -> None:
        """Change a process's title in place (setproctitle): same process, same inode."""
        (self.root / str(pid) / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))

    def set_comm(self, pid: int, comm: str) -> None:
        """Change comm in place, as exec does (same pid, same /proc inode)."""
        stat = self.root / str(pid) / "stat"
        text = stat.read_text()
        stat.write_text(f"{pid} ({comm}) " + text[text.rindex(")") + 2:])

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def fake_proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


# --- real Redis -------------------------------------------------------------------------

@pytest.fixture
def redis_server(children: Children, tmp_path: Path) -> Callable[[int], subprocess.Popen[bytes]]:
    binary = require_binary("redis-server")

    def start(port: int) -> subprocess.Popen[bytes]:
        proc = children.start([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)])
        wait_for(lambda: port_open(port), 10, what=f"redis on {port}")
        return proc

    return start


@pytest.fixture
def redis_port(redis_server: Callable[[int], subprocess.Popen[bytes]]) -> int:
    """The port of a fresh, empty Redis started for the test."""
    port = free_port()
    redis_server(port)
    return port


def stop_config_services(config: Any) -> None:
    """Stop every process the config's services match (what the receiver may have started)."""
    reader = ProcReader()
    found = scan_services(reader, config.services, (os.getpid(),), with_fds=False)
    procs = [p for ps in found.values() for p in ps]
    send_signal(reader, procs, signal.SIGKILL)
    wait_for(lambda: not any(scan_services(reader, config.services, (os.getpid(),), with_fds=False).values()), 10,
             what="services to stop")


# --- a real Alertmanager -------------------------------------------------------------------

@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require_binary("prometheus-alertmanager", "alertmanager")
    tmp = tmp_path_factory.mktemp("am")
    (tmp / "am.yml").write_text("route: {receiver: nobody}\nreceivers: [{name: nobody}]\n")
    port = free_port()
    children = Children()
    children.start([binary, f"--config.file={tmp / 'am.yml'}", f"--storage.path={tmp}",
                    f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="])
    try:
        wait_for(lambda: port_open(port), 20, what="alertmanager")
        yield f"http://127.0.0.1:{port}"
    finally:
        children.stop_all()


# --- real PostgreSQL ----------------------------------------------------------------------

def postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    return require_binary(name)


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with SCRAM password authentication."""

    def __init__(self, root: Path, port: int, password: str) -> None:
        self.root, self.port, self.password = root, port, password
        self.proc: subprocess.Popen[bytes] | None = None
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> None:
        initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "pw").write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.root / "pw", "postgres")
        subprocess.run([*self.as_user, initdb, "-D", str(self.root / "data"), "-U", "postgres",
                        "--auth=scram-sha-256", f"--pwfile={self.root / 'pw'}", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        with open(self.root / "postgres.log", "ab") as out:
            self.proc = subprocess.Popen(
                [*self.as_user, postgres, "-D", str(self.root / "data"), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        # Listening is not ready: until recovery ends it answers "the database system is
        # starting up". pg_isready asks the server itself (exit 0: accepting connections).
        isready = postgres_bin("pg_isready")
        wait_for(lambda: subprocess.run([isready, "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                                        timeout=10).returncode == 0, 30, interval=0.1,
                 what="postgres to accept connections")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Postgres]:
    postgres_bin("postgres")
    root = Path(tempfile.mkdtemp(prefix="caretaker-pg-"))  # pytest's tmp dirs are 0700: not for user postgres
    os.chmod(root, 0o755)
    server = Postgres(root / "cluster", free_port(), "s3cret-pw")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- receiver apps ------------------------------------------------------------------------

AUTH_TOKEN = "test-token-0123456789"


@pytest.fixture
async def receiver_for() -> Any:
    """receiver_for(config) -> a started test client; at teardown the config's services
    are stopped first (so closing the app reaps them), then the app."""
    from aiohttp.test_utils import TestClient, TestServer

    from receiver.app import create_app

    made: list[tuple[Any, Any]] = []

    async def make(config: Any) -> Any:
        client = TestClient(TestServer(create_app(config), host="127.0.0.1"))
        await client.start_server()
        made.append((client, config))
        return client

    yield make
    for client, config in made:
        await leave_alone(client)
        stop_config_services(config)
        await client.close()


async def leave_alone(client: Any) -> None:
    """Pause every service of a receiver under test, so that its workers, which repair
    what they see broken, do not start again what the test's teardown stops."""
    from receiver.app import EXECUTOR_KEY

    executor = client.server.app.get(EXECUTOR_KEY)
    if executor is None or client.server.closed:  # never started, or closed by the test already
        return
    for name in executor.config.services:
        await executor.pause(name, None, "test teardown")


async def settle(client: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until the receiver has no repair in flight; its audit trail, newest first."""
    import asyncio

    from receiver.app import EXECUTOR_KEY

    executor = client.server.app[EXECUTOR_KEY]
    deadline = time.monotonic() + timeout
    while executor.pending:
        assert time.monotonic() < deadline, "repairs did not finish"
        await asyncio.sleep(0.05)
    resp = await client.get("/api/v1/remediations", headers={"Authorization": f"Bearer {AUTH_TOKEN}"})
    return list((await resp.json())["data"])


# --- exporter apps ------------------------------------------------------------------------

@pytest.fixture
async def exporter_for() -> Any:
    """exporter_for(config, reader=None) -> a started test client (real /proc unless given)."""
    from aiohttp.test_utils import TestClient, TestServer

    from exporter.app import create_app

    clients: list[Any] = []

    async def make(config: Any, reader: ProcReader | None = None) -> Any:
        client = TestClient(TestServer(create_app(config, reader), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()
