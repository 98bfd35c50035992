"""What the test modules share: ports, waits, child processes, a fake /proc tree, real
servers, configs, alerts, scrapes.

Test modules import these from here, never from one another (tests/test_suite.py
checks it); fixtures are in conftest.py. Two rules for waiting:

- In an ``async def`` test the app under test (the aiohttp test server, the receiver's
  workers, the exporter's scans) runs on the test's own event loop: wait there with
  ``await wait_until(...)`` and ``await asyncio.sleep(...)``, never with
  :func:`wait_for` or ``time.sleep``, which stop the app while the test waits
  (conftest.py fails a test that sleeps on the loop).
- Wait for a state (a file written, a port open, a signal handler installed, a log
  line), never for a fixed time, unless the time itself is what is tested (a stall,
  a window in which nothing may happen): such a sleep says so in a comment.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import SCRAPER_KEY
from exporter.app import create_app as create_exporter
from exporter.config import Config, parse_config
from exporter.heartbeats import HeartbeatStore
from exporter.procfs import ProcessInfo, ProcReader, scan_services
from receiver.actions import StepLog
from receiver.app import EXECUTOR_KEY
from receiver.app import create_app as create_receiver
from receiver.process import send_signal

REPO = Path(__file__).resolve().parent.parent
FLEET_SCRIPT = REPO / "scripts" / "fleet-alertmanager.py"
"""Writes per-host Alertmanager routes from a host list (tests/test_fleet*.py)."""
FLEET_DIR = REPO / "prometheus" / "fleet"
"""The fleet's example Prometheus and Alertmanager files."""
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

Client = TestClient[web.Request, web.Application]


# --- ports and programs ------------------------------------------------------------------

def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_handed_out: set[int] = set()
_ports = random.SystemRandom()  # not the random module's: tests may seed that, and two runs would then collide


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server the test starts: picked at random
    outside the kernel's ephemeral range (ip_local_port_range), so no outgoing connection
    of the machine takes it between this call and the server's bind (a port from the
    ephemeral range, as bind(0) gives, can be), and never the same one twice in a run."""
    low, high = _ephemeral_ports()
    for _ in range(200):
        port = _ports.randint(10000, 65535)
        if low <= port <= high or port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # nothing found outside the range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require_binary(*names: str) -> str:
    """Path of the first program found; under CI a missing one fails the test (never skips)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' or '.join(names)} not installed (Debian packages; `make test` installs them)"
    if IN_CI:  # under CI a missing binary fails, never skips
        pytest.fail(message)
    pytest.skip(message)


def make_cert(tmp_path: Path, days: int = 30) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (openssl): (cert.pem, key.pem) in ``tmp_path``."""
    openssl = require_binary("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", str(days), "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


# --- waiting -------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` seconds.
    Blocks the thread: for sync tests and fixtures only (async ones: :func:`wait_until`)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until(predicate: Callable[[], object | Awaitable[object]], timeout: float, interval: float = 0.05,
                     what: str = "condition") -> Any:
    """:func:`wait_for` for async tests: the event loop (and the app under test on it)
    runs while it waits. ``predicate`` may be a coroutine function. Returns its first
    true value; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# --- processes -----------------------------------------------------------------------------

class Children:
    """Processes a test started; each in its own group, stopped by group at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, start_new_session=True,  # type: ignore[call-overload]
                                                         **kwargs)
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


def _status_mask(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    return 0


def signal_ignored(pid: int, sig: signal.Signals) -> bool:
    """The process ignores ``sig`` (SIG_IGN), from SigIgn in /proc/PID/status (bit N-1 for signal N)."""
    return bool(_status_mask(pid, "SigIgn") & (1 << (sig - 1)))


def signal_caught(pid: int, sig: signal.Signals) -> bool:
    """The process has a handler for ``sig``, from SigCgt in /proc/PID/status: a child
    script's ``signal.signal(sig, handler)`` has run."""
    return bool(_status_mask(pid, "SigCgt") & (1 << (sig - 1)))


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (``S`` sleeping, ``T`` stopped...); ``X`` once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return text[text.rindex(")") + 2]


def started_ticks_ago(pid: int) -> int:
    """Clock ticks (1/100 s) since the process started, by the kernel's own clock
    (/proc/uptime against the start time in /proc/PID/stat): a process started once
    this is positive has a later start time than ``pid``."""
    text = Path(f"/proc/{pid}/stat").read_text()
    start = int(text[text.rindex(")") + 2:].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return round(uptime * os.sysconf("SC_CLK_TCK")) - start


def processes(config: Config, service: str = "svc") -> list[ProcessInfo]:
    """The processes of ``service`` running now, as the receiver would find them."""
    return scan_services(ProcReader(), {service: config.services[service]}, (os.getpid(),))[service]


def pids(config: Config, service: str = "svc") -> list[int]:
    return [p.pid for p in processes(config, service)]


def _config_processes(config: Config) -> list[ProcessInfo]:
    found = scan_services(ProcReader(), config.services, (os.getpid(),), with_fds=False)
    return [p for ps in found.values() for p in ps]


def stop_config_services(config: Config) -> None:
    """SIGKILL every process the config's services match, and wait until none is left.
    Blocks: for sync tests (async ones: :func:`stop_services`)."""
    send_signal(ProcReader(), _config_processes(config), signal.SIGKILL)
    wait_for(lambda: not _config_processes(config), 10, what="services to stop")


async def kill_child(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process the test started itself (if it still runs) and reap it, off the loop."""
    if proc.poll() is None:
        proc.kill()
    await asyncio.to_thread(proc.wait, 10)


async def stop_services(config: Config) -> None:
    """:func:`stop_config_services` for async tests: a receiver under test on this loop
    reaps what it started while the test waits."""
    send_signal(ProcReader(), _config_processes(config), signal.SIGKILL)
    await wait_until(lambda: not _config_processes(config), 10, what="services to stop")


# --- a fake /proc tree --------------------------------------------------------------------

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


# --- real PostgreSQL ----------------------------------------------------------------------

def postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    return require_binary(name)


PG_NO_SYNC = ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
"""postgres(1) settings for throwaway test clusters: nothing here tests durability, and
with fsync on a restart after SIGKILL syncs every file of the data directory (crash
recovery), seconds on a slow disk inside a measured repair. initdb takes ``--no-sync``."""


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
                        "--auth=scram-sha-256", f"--pwfile={self.root / 'pw'}", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        with open(self.root / "postgres.log", "ab") as out:
            self.proc = subprocess.Popen(
                [*self.as_user, postgres, "-D", str(self.root / "data"), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}", *PG_NO_SYNC],
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


# --- configs -----------------------------------------------------------------------------

AUTH_TOKEN = "test-token-0123456789"
"""The receiver's bearer token in configs made with ``token=True``."""
TOKEN = AUTH_TOKEN
AUTH = {"Authorization": f"Bearer {AUTH_TOKEN}"}

SLEEPER = "import time\nwhile True: time.sleep(1)\n"
"""A service that runs until it is stopped, and obeys SIGTERM."""


HOLDS_ON_TERM = ("import os, signal, sys, time\n"
                 "asked = []\n"
                 "signal.signal(signal.SIGTERM, lambda *_: asked.append(1))\n"
                 "while not (asked and not os.path.exists(sys.argv[1])): time.sleep(0.05)\n")
"""A service script (``sleeper(HOLDS_ON_TERM, flag)``) that, asked to stop (SIGTERM),
exits only once the file ``flag`` is gone: a stop phase that lasts exactly as long as
the test needs (give it a long grace period), where a process ignoring SIGTERM would
hold it for the grace period and no longer."""


def sleeper(script: str = SLEEPER, *args: str, grace: float = 2.0, verify: float = 10.0,
            **extra: Any) -> dict[str, Any]:
    """A service (``services.<name>``) that runs ``python -c script *args MARKER``, found
    by its marker (unique to the call), started with its output to ``MARKER.log``,
    stopped with ``grace`` seconds for SIGTERM, and which the receiver may restart
    (verified within ``verify`` seconds). ``extra`` adds or replaces top-level keys."""
    marker = f"svc-{uuid.uuid4().hex[:12]}"
    return {"match": {"cmdline": f"{marker}$"},
            "start": {"argv": [sys.executable, "-c", script, *args, marker], "log_file": f"{marker}.log"},
            "stop": {"grace_period": grace},
            "remediation": {"allow": ["restart"], "verify_timeout": verify}, **extra}


def idle_service(**keys: Any) -> dict[str, Any]:
    """A service (``services.<name>``) none of whose processes runs: its match finds
    nothing. ``keys`` add or replace top-level keys."""
    return {"match": {"comm": "^nothing-matches$"}, **keys}


def build_config(directory: Path, services: Mapping[str, Any] | None = None, /, *,
                 service: Mapping[str, Any] | None = None, exporter: Mapping[str, Any] | None = None,
                 token: bool = False, **receiver: Any) -> Config:
    """A :class:`Config` validated as the programs validate a file (``parse_config``),
    with ``directory`` as the config file's directory: relative paths, state files and
    secrets are there.

    ``services`` maps names to ``services.<name>`` entries; or ``service`` is the one
    service ``svc``. ``exporter`` and ``receiver`` are merged over the test defaults:
    the exporter's state in ``state.json``, the receiver's in ``state.sqlite``, and
    ``cooldown: 0`` (a repair may follow another at once; a test of the cooldown sets
    one). ``token`` writes :data:`AUTH_TOKEN` to ``token`` and sets
    ``receiver.bearer_token`` to it. Raises ``ConfigError`` as the programs would."""
    if (services is None) == (service is None):
        raise TypeError("give either services or service")
    if token:
        (directory / "token").write_text(AUTH_TOKEN + "\n")
        receiver = {"bearer_token": {"file": "token"}, **receiver}
    data = {"exporter": {"state_file": "state.json", **(exporter or {})},
            "receiver": {"state_file": "state.sqlite", "cooldown": 0, **receiver},
            "services": dict(services) if services is not None else {"svc": dict(service or {})}}
    return parse_config(data, source=str(directory / "caretaker.yml"), base_dir=directory)


class MakeConfig(Protocol):
    """The ``make_config`` fixture: :func:`build_config` in the test's ``tmp_path``
    (or ``directory``)."""

    def __call__(self, services: Mapping[str, Any] | None = None, /, *, service: Mapping[str, Any] | None = None,
                 exporter: Mapping[str, Any] | None = None, token: bool = False, directory: Path | None = None,
                 **receiver: Any) -> Config: ...


def supervisord_conf(directory: Path, program: str) -> Path:
    """Writes ``directory/supervisord.conf``: a supervisord in the foreground, its socket,
    log and pidfile in ``directory``, running ``[program:worker]`` whose settings are
    ``program`` (``command=...`` lines). Returns the file's path."""
    conf = directory / "supervisord.conf"
    conf.write_text(f"""[unix_http_server]
file={directory}/supervisor.sock
[supervisord]
logfile={directory}/supervisord.log
pidfile={directory}/supervisord.pid
nodaemon=true
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{directory}/supervisor.sock
[program:worker]
{program}""")
    return conf


DEADLOCKING_WORKER = """\
import importlib.util, os, sys, threading, time
assert importlib.util.find_spec("exporter") is None, "caretaker's exporter package is on the path"
from caretaker_client import Heartbeat

flag, ready_file, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
lock, held = threading.Lock(), threading.Event()

def hold_the_lock_forever():
    with lock:
        held.set()
        threading.Event().wait()

heartbeat = Heartbeat("worker", interval=interval).start()
with open(ready_file) as f:
    time.sleep(float(f.read()))  # getting ready: no job done yet, so no beat
print(f"pid {os.getpid()} first beat at {time.time():.6f}", flush=True)
jobs = 0
while True:
    if os.path.exists(flag):
        os.unlink(flag)
        threading.Thread(target=hold_the_lock_forever, daemon=True).start()
        held.wait()
        print(f"pid {os.getpid()} deadlocks after {jobs} jobs", flush=True)
    with lock:  # one job
        jobs += 1
    heartbeat.beat()
    time.sleep(0.02)
"""
"""A worker with only ``caretaker_client`` on its path (``python -S -c``; argv: the
deadlock flag file, a file holding the seconds to wait before its first job, the heartbeat
sender's interval). Each job of its loop takes a lock and beats heartbeat ``worker``; when
the flag file appears, a thread takes the lock for ever, so the loop deadlocks while the
process and its threads live."""


def log_tails(paths: Iterable[Path], lines: int = 15, relative_to: Path | None = None) -> None:
    """Writes the last ``lines`` lines of each log to stderr (pytest shows them with a
    failure): what an end-to-end test's processes said before it ended."""
    for path in paths:
        tail = "".join(path.read_text(errors="replace").splitlines(True)[-lines:]) if path.exists() else "(none)\n"
        name = path.relative_to(relative_to) if relative_to is not None else path.name
        sys.stderr.write(f"--- {name} (tail)\n{tail}")


def receiver_audit(port: int, token: str, limit: int = 200) -> list[dict[str, Any]]:
    """The audit trail of the receiver listening on ``port`` (``GET /api/v1/remediations``),
    newest first."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/remediations?limit={limit}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        data: list[dict[str, Any]] = json.load(resp)["data"]
    return data


# --- alerts and the receiver ---------------------------------------------------------------

def alert(fingerprint: str = "a1b2c3", status: str = "firing", starts_at: str = "2026-11-22T03:00:00Z",
          **labels: str) -> dict[str, Any]:
    """One alert of an Alertmanager webhook notification (alertname CaretakerServiceDown unless given)."""
    return {"status": status, "labels": {"alertname": "CaretakerServiceDown", **labels}, "annotations": {},
            "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": fingerprint}


def notification(*alerts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An Alertmanager webhook notification (version 4) of ``alerts``."""
    return {"version": "4", "status": "firing", "receiver": "caretaker", "groupKey": "{}:{}", "truncatedAlerts": 0,
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am",
            "alerts": list(alerts), **extra}


async def post_alerts(client: Client, *alerts: dict[str, Any]) -> dict[str, Any]:
    """POST one notification of ``alerts``; asserts 200 and returns the answer."""
    resp = await client.post("/alerts", json=notification(*alerts), headers=AUTH)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def leave_alone(client: Client) -> None:
    """Pause every service of a receiver under test, so that its workers, which repair
    what they see broken, do not start again what the test's teardown stops."""
    executor = client.app.get(EXECUTOR_KEY)
    if executor is None or client.server.closed:  # never started, or closed by the test already
        return
    for name in executor.config.services:
        await executor.pause(name, None, "test teardown")


async def audit(client: Client, **query: str) -> list[dict[str, Any]]:
    """The receiver's audit trail now, newest first (repairs in flight included)."""
    resp = await client.get("/api/v1/remediations", params=query, headers=AUTH)
    assert resp.status == 200
    return list((await resp.json())["data"])


async def settle(client: Client, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until the receiver has no repair in flight; its audit trail, newest first."""
    executor = client.app[EXECUTOR_KEY]
    await wait_until(lambda: not executor.pending, timeout, what="repairs to finish")
    resp = await client.get("/api/v1/remediations", headers=AUTH)
    return list((await resp.json())["data"])


async def wait_audit(client: Client, done: Callable[[list[dict[str, Any]]], object],
                     timeout: float = 20.0) -> list[dict[str, Any]]:
    """The audit trail (newest first) once ``done(entries)`` holds."""
    entries: list[dict[str, Any]] = []

    async def holds() -> bool:
        nonlocal entries
        entries = await settle(client)
        return bool(done(entries))

    try:
        await wait_until(holds, timeout, interval=0.1, what="the audit trail")
    except AssertionError as err:
        raise AssertionError([(e["fingerprint"], e["decision"], e["reason"]) for e in entries]) from err
    return entries


async def incident(client: Client, config: Config, fingerprint: str, previous: str | None = None) -> None:
    """Service ``svc`` dies again: the previous alert resolved, the service is killed, a new alert fires."""
    if previous is not None:
        resolved = notification(alert(previous, status="resolved", service_name="svc", remediation="restart"))
        assert (await client.post("/alerts", json=resolved, headers=AUTH)).status == 200
        await settle(client)
    await stop_services(config)
    fired = notification(alert(fingerprint, service_name="svc", remediation="restart"))
    assert (await client.post("/alerts", json=fired, headers=AUTH)).status == 200


class ManualClock:
    """A clock the test moves on (Unix seconds), for the receiver's ``clock``: a cooldown
    or a backoff passes at once instead of being waited out. It starts at the real time,
    so what the receiver compares with file times (heartbeats) stays sensible."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def receiver_with_clock(config: Config, clock: ManualClock) -> AsyncIterator[Client]:
    """A started receiver whose executor reads ``clock``; at the end its services are
    paused and stopped, then the app is closed."""
    client = TestClient(TestServer(create_receiver(config, clock=clock), host="127.0.0.1"))
    try:
        await client.start_server()
        yield client
    finally:
        await leave_alone(client)
        await stop_services(config)
        await client.close()


def log_text(steps: StepLog) -> str:
    """The messages of a repair's steps, one a line."""
    return "\n".join(s["message"] for s in steps.steps)


# --- the exporter ----------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(data: Samples, name: str, **labels: str) -> float:
    return data[(name, frozenset(labels.items()))]


async def scrape(client: Client, timeout: str | None = None) -> str:
    """GET /metrics (as Prometheus, with its scrape timeout header if given); asserts 200
    and the text format."""
    headers = {"X-Prometheus-Scrape-Timeout-Seconds": timeout} if timeout else {}
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    return await resp.text()


async def scrape_samples(client: Client) -> Samples:
    return samples(await scrape(client))


@contextlib.asynccontextmanager
async def serving(app: web.Application, port: int | None = None, **site: Any) -> AsyncIterator[int]:
    """``app`` listening on 127.0.0.1 (``port``, or a free one; ``site``: TCPSite's other
    arguments, e.g. ``ssl_context``): the port. Cleaned up even when the port cannot be
    bound, so that what the app opened at start (a client session) is closed."""
    port = port or free_port()
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, **site).start()
        yield port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serving_exporter(config: Config) -> AsyncIterator[tuple[str, HeartbeatStore]]:
    """The real exporter app listening on ``config.exporter.port``: (its URL, its heartbeat store)."""
    app = create_exporter(config)
    async with serving(app, config.exporter.port) as port:
        yield f"http://127.0.0.1:{port}", app[SCRAPER_KEY].heartbeats


def run(argv: list[str], cwd: Path = REPO, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end (at most 60 s), output captured as text, exit status not checked."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, check=False, **kwargs)


def core_panels_without_data(query: Callable[[str], list[dict[str, Any]]], variables: dict[str, str],
                             check: Callable[[str, str, list[dict[str, Any]]], None] | None = None,
                             grace: float = 15.0) -> list[str]:
    """Every dashboard panel's queries (grafana.generate.queries with ``variables``) run
    through ``query`` (a Prometheus instant query returning its result list; one that does
    not parse raises there), ``check(board, title, results)`` called on each panel's
    results; returns the core panels (grafana.generate.CORE) still without data after
    looking again for up to ``grace`` seconds (one late scrape leaves a gap), as
    "board: title"."""
    from grafana.generate import CORE, queries

    empty = []
    for board, title, exprs in queries(variables):
        results = [r for expr in exprs for r in query(expr)]
        if check is not None:
            check(board, title, results)
        if title in CORE[board] and not results:
            empty.append((board, title, exprs))
    deadline = time.monotonic() + grace
    while empty and time.monotonic() < deadline:
        time.sleep(1)
        empty = [(b, t, exprs) for b, t, exprs in empty if not any(query(e) for e in exprs)]
    return [f"{b}: {t}" for b, t, _ in empty]
