"""Heal times: caretaker's local stack against supervisord and monit, in one run.

    .venv/bin/python bench/heal.py [--incidents 5] [--tools caretaker,supervisord,monit]

Each tool looks after the same two services, a Redis (``redis-server`` with one
config file) and the demo web app (``demo/webapp.py``), on free ports of 127.0.0.1:

- caretaker: ``demo.stack.Stack`` as ``make run`` runs it (exporter, receiver,
  Prometheus with the shipped rules and 1 s scrape/evaluation, Alertmanager with the
  shipped config), from a config in a temporary directory, on free ports;
- supervisord: ``autorestart=true`` for both programs, in the foreground
  (``nodaemon``), its own unix socket in the temporary directory;
- monit: ``set daemon 1``, ``monit -I``, its own control, pid, state and id files in
  the temporary directory, no httpd; a ``check process ... matching`` per service with
  ``if failed ... protocol redis`` / ``protocol http request "/health"`` ``for 2 cycles
  then restart``. Monit runs a program as argv, through no shell, and waits for a
  start program to exit (30 s, then it gives up and kills it), so it starts Redis with
  ``--daemonize yes`` and the web app with a two-line ``/bin/sh`` script that puts it
  in the background, output to a log file; the stop program is a script that sends
  SIGTERM, then SIGKILL after the grace period (the process's pid from monit's
  ``MONIT_PROCESS_PID``). The start programs get ``with timeout 5 seconds``: monit
  does not test the port of a process younger than that (30 s by default), and the
  incidents come a few seconds apart.

The incidents, interleaved (one of each kind, then again): Redis killed with SIGKILL,
the web app killed with SIGKILL, the web app frozen with SIGSTOP. The heal time runs
from sending the signal to the first answer from a *new* process: ``+PONG`` to a
``PING`` (and the server's ``process_id`` from ``INFO server``) for Redis, a 200 from
``/health`` (whose body carries the pid) for the web app. A process is its pid and
its start time, so a reused pid is not taken for the old process; while the old one
is still there (frozen) it holds the port, so it is not asked. An incident not
healed within ``--deadline`` seconds is a timeout (a frozen process is then resumed
with SIGCONT). Before each incident both services must have answered from the same
processes for ``--stable`` seconds, the one about to be broken for ``--min-age``
seconds: a freshly restarted service is not broken again at once (monit does not test
a young process's port; caretaker's receiver handles a problem until its alert
resolves), and the freeze, which follows the web app's restart, waits for that.

"Needless restarts" are restarts of the service that was *not* broken, seen while
the incident is healed and settles; "extra restarts" are further restarts of the
broken service after it served again. Both are seen by polling, so two restarts in
quick succession may count as one.

Fairness: stop grace periods are those of the shipped ``caretaker.yml`` (Redis 5 s,
web app 3 s), used by caretaker (``stop.grace_period``), monit (its stop script) and
supervisord (``stopwaitsecs``). caretaker's receiver gets a 2 s cooldown and an
attempt budget of 1000, since this benchmark breaks the same services again and
again (the shipped 20 s / 3 per 15 min would refuse the later repairs); supervisord
and monit keep their defaults. Timing resolution: about 0.1 s.

Bounded: at most ``--incidents`` per tool and kind, each within ``--deadline`` plus
at most ``--settle-timeout`` to settle; no incident is started once the time limit
(``--time-limit``, shared among the tools, the cheaper ones first) is spent. The
script becomes a child subreaper, so whatever the tools start and leave behind is
reparented to it; everything is stopped by pid (after checking its start time) or by
the process group of a program it started, never by name, and the temporary
directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from scrape import free_port

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/heal.py`: demo/ is not an installed package
    sys.path.insert(0, str(REPO))

from demo.stack import Stack  # noqa: E402

WEBAPP = REPO / "demo" / "webapp.py"
GRACE = {"redis": 5.0, "webapp": 3.0}  # caretaker.yml's stop.grace_period
TOOLS = ("caretaker", "supervisord", "monit")
RUN_ORDER = ("monit", "supervisord", "caretaker")  # cheapest first: what they leave over goes to the next
SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")
PR_SET_CHILD_SUBREAPER = 36


class ToolFailed(Exception):
    """The tool could not be set up, or left a service broken: its remaining incidents are not run."""


# --- processes ----------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()


@dataclass(frozen=True)
class Ident:
    """A process: its pid and start time (clock ticks after boot), so a reused pid is another process."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Ident | None:
        fields = _stat(pid)
        return cls(pid, int(fields[19])) if fields else None

    def state(self) -> str | None:
        """Scheduler state (``T`` stopped, ``Z`` zombie...), None once it is gone."""
        fields = _stat(self.pid)
        return fields[0] if fields and int(fields[19]) == self.started else None

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to this very process (a pidfd, checked against the start time)."""
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return False
        try:
            if self.state() is None:
                return False
            signal.pidfd_send_signal(fd, sig)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def become_subreaper() -> bool:
    """Orphans among our descendants become our children (Linux), for the final sweep."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def our_children(exclude: Iterable[int] = ()) -> list[Ident]:
    """Our child processes (adopted orphans included), but those in ``exclude``."""
    me, skip, found = os.getpid(), set(exclude), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        fields = _stat(int(entry))
        if fields and int(fields[1]) == me:
            found.append(Ident(int(entry), int(fields[19])))
    return found


class Reaper(threading.Thread):
    """Reaps the orphans this subreaper adopts as soon as they exit, as init would: a
    daemonized service that dies would otherwise stay a zombie, which monit takes for a
    live process. Never the children in ``exclude`` (their ``Popen`` reaps them)."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__(name="reaper", daemon=True)
        self.exclude = exclude
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.02):
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if info is None:
                continue
            if info.si_pid not in self.exclude:
                reap(info.si_pid)
            else:  # the tool itself has exited (its run stops after this incident): look past it
                for child in our_children(exclude=self.exclude):
                    if child.state() == "Z":
                        reap(child.pid)
                self.stopping.wait(0.2)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def terminate(idents: Iterable[Ident], grace: float = 5.0) -> None:
    """SIGCONT (a frozen process cannot act on SIGTERM), SIGTERM, SIGKILL after ``grace``; reap our children."""
    alive = [i for i in set(idents) if i.state() not in (None, "Z")]
    for ident in alive:
        ident.signal(signal.SIGCONT)
        ident.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for ident in alive:
            reap(ident.pid)
        alive = [i for i in alive if i.state() not in (None, "Z")]
        if not alive:
            break
        time.sleep(0.1)
    for ident in alive:
        ident.signal(signal.SIGKILL)
    time.sleep(0.1)
    for ident in idents:
        reap(ident.pid)


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Stop a program we started in its own session: SIGTERM to its group, SIGKILL after ``grace``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --- the two services, as a client sees them ------------------------------------------

def redis_pid(port: int, timeout: float) -> int | None:
    """``PING`` answered with ``+PONG``, then the server's own ``process_id``; None otherwise."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\nINFO server\r\n")
            buf = b""
            while True:
                if (len(buf) >= 7 and not buf.startswith(b"+PONG\r\n")) or buf[7:8] not in (b"", b"$"):
                    return None
                end = buf.find(b"\r\n", 7)
                if end > 7 and buf[7:8] == b"$":
                    length = int(buf[8:end])
                    body = buf[end + 2:end + 2 + length]
                    if len(body) == length:
                        found = re.search(rb"^process_id:(\d+)", body, re.MULTILINE)
                        return int(found.group(1)) if found else None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk
    except (OSError, ValueError):
        return None


def webapp_pid(port: int, timeout: float) -> int | None:
    """``GET /health`` answered 200; the pid from its body (the demo web app puts it there)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        pid = json.loads(body).get("pid")
        return pid if isinstance(pid, int) else None
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return None
    finally:
        conn.close()


@dataclass
class Service:
    name: str
    port: int
    ask: Callable[[int, float], int | None]
    seen: set[Ident] = field(default_factory=set)
    """Every process seen serving: what the final sweep makes sure is gone."""

    def serving(self, timeout: float) -> Ident | None:
        """The process that answers now, or None when nothing answers in time."""
        pid = self.ask(self.port, timeout)
        ident = Ident.of(pid) if pid is not None else None
        if ident is not None:
            self.seen.add(ident)
        return ident


class Track:
    """The distinct processes a service was served by, in order."""

    def __init__(self, first: Ident | None = None) -> None:
        self.idents: list[Ident] = [first] if first else []

    def see(self, ident: Ident | None) -> None:
        if ident is not None and (not self.idents or self.idents[-1] != ident):
            self.idents.append(ident)

    @property
    def restarts(self) -> int:
        return max(0, len(self.idents) - 1)


# --- the tools ----------------------------------------------------------------------

@dataclass
class Workspace:
    root: Path
    redis_bin: str
    redis_port: int
    webapp_port: int

    @property
    def redis_conf(self) -> Path:
        return self.root / "redis.conf"

    def write_redis_conf(self) -> None:
        self.redis_conf.write_text(
            f'bind 127.0.0.1\nport {self.redis_port}\nsave ""\nappendonly no\ndaemonize no\n'
            f"dir {self.root}\nlogfile {self.root / 'redis.log'}\n")

    def webapp_argv(self) -> list[str]:
        return [sys.executable, str(WEBAPP), "--port", str(self.webapp_port)]


class Tool:
    name = ""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def problem(self) -> str | None:
        """Why the tool itself is no longer running, if it is not."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"{self.name} exited with status {self.proc.returncode}"
        return None

    def own_pids(self) -> set[int]:
        return {self.proc.pid} if self.proc is not None else set()

    def logs(self) -> list[Path]:
        return sorted(p for p in self.ws.root.rglob("*") if p.is_file() and p.suffix in (".log", ".out"))

    def spawn(self, argv: list[str], log: Path) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.ws.root)


def check_paths(*paths: str | Path) -> None:
    """Paths go into config files (supervisord's command=, monit's quoted programs) unquoted."""
    for path in paths:
        if not SAFE_PATH.match(str(path)):
            raise ToolFailed(f"path with characters not usable unquoted in a config file: {path}")


class Caretaker(Tool):
    """``demo.stack.Stack`` on free ports with a config like the shipped caretaker.yml."""

    name = "caretaker"

    def __init__(self, ws: Workspace) -> None:
        super().__init__(ws)
        self.stack: Stack | None = None
        self.prometheus_port = free_port()

    def config(self) -> dict[str, Any]:
        ws = self.ws
        return {
            "exporter": {"listen_address": "127.0.0.1", "port": free_port()},
            "receiver": {"listen_address": "127.0.0.1", "port": free_port(),
                         "bearer_token": {"file": "secrets/receiver-token"}, "state_file": "caretaker-state.sqlite",
                         "cooldown": "2s", "attempts": {"max": 1000, "window": "15m"}},
            "services": {
                "redis": {
                    "match": {"comm": "^redis-server$", "cmdline": f":{ws.redis_port}\\b"},
                    "processes": {"min": 1, "max": 1},
                    "probes": [{"name": "port", "type": "tcp", "host": "127.0.0.1", "port": ws.redis_port,
                                "timeout": "1s"}],
                    "start": {"argv": [ws.redis_bin, str(ws.redis_conf)], "log_file": "logs/redis.out"},
                    "stop": {"signal": "SIGTERM", "grace_period": f"{GRACE['redis']:g}s"},
                    "remediation": {"allow": ["restart"], "verify_timeout": "15s"},
                },
                "webapp": {
                    "match": {"cmdline": f"webapp\\.py --port {ws.webapp_port}$"},
                    "processes": {"min": 1, "max": 1},
                    "probes": [{"name": "health", "type": "http", "timeout": "1s",
                                "url": f"http://127.0.0.1:{ws.webapp_port}/health"}],
                    "start": {"argv": ws.webapp_argv(), "log_file": "logs/webapp.log"},
                    "stop": {"signal": "SIGTERM", "grace_period": f"{GRACE['webapp']:g}s"},
                    "remediation": {"allow": ["restart"], "verify_timeout": "15s"},
                },
            },
        }

    def start(self) -> None:
        path = self.ws.root / "caretaker.yml"
        path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.stack = Stack(path, self.ws.root / "run", prometheus_port=self.prometheus_port,
                           alertmanager_port=free_port())
        self.stack.start()
        self.stack.wait_ready(60.0)
        # Prometheus scraping both caretaker programs, so the first incident is seen from its start.
        query = urllib.parse.urlencode({"query": "count(up == 1)"})
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?{query}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                with urllib.request.urlopen(url, timeout=2) as resp:
                    result = json.load(resp)["data"]["result"]
                if result and float(result[0]["value"][1]) >= 2:
                    return
            if time.monotonic() > deadline:
                raise ToolFailed("Prometheus is not scraping the exporter and the receiver after 30 s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()

    def logs(self) -> list[Path]:
        return (sorted((self.ws.root / "run" / "logs").glob("*.log")) + sorted((self.ws.root / "logs").glob("*"))
                + [self.ws.root / "redis.log"])


class Supervisord(Tool):
    name = "supervisord"

    def start(self) -> None:
        root, ws = self.ws.root, self.ws
        programs = {"redis": [ws.redis_bin, str(ws.redis_conf)], "webapp": ws.webapp_argv()}
        sections = [
            "[supervisord]", "nodaemon=true", f"logfile={root / 'supervisord.log'}",
            f"pidfile={root / 'supervisord.pid'}", f"childlogdir={root}", "",
            "[unix_http_server]", f"file={root / 'supervisor.sock'}", "chmod=0700", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl=unix://{root / 'supervisor.sock'}", "",
        ]
        for name, argv in programs.items():
            sections += [f"[program:{name}]", f"command={' '.join(argv)}", f"directory={root}", "autostart=true",
                         "autorestart=true", "startsecs=1", "stopsignal=TERM", f"stopwaitsecs={GRACE[name]:g}",
                         "redirect_stderr=true", f"stdout_logfile={root / (name + '.log')}", ""]
        check_paths(root, ws.redis_conf, ws.redis_bin, sys.executable, WEBAPP)
        conf = root / "supervisord.conf"
        conf.write_text("\n".join(sections))
        binary = shutil.which("supervisord")
        if binary is None:
            raise ToolFailed("supervisord is not installed (Debian package supervisor)")
        self.spawn([binary, "-n", "-c", str(conf)], root / "supervisord.out")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, sum(GRACE.values()) + 10)


# Monit skips the connection tests of a process younger than its start program's timeout
# (30 s by default): a freeze within 30 s of a restart would go unseen that long.
MONIT_START_TIMEOUT = 5
MONIT_STOP = """#!/bin/sh
# monit's stop program, as caretaker stops a service: SIGTERM, then SIGKILL when it
# is still there after the grace period ($1 tenths of a second).
pid=${MONIT_PROCESS_PID:-0}
[ "$pid" -gt 1 ] 2>/dev/null || exit 0
kill -TERM "$pid" 2>/dev/null || exit 0
i=0
while [ "$i" -lt "$1" ]; do
    state=$(sed -n 's/^State:[[:space:]]*\\([A-Z]\\).*/\\1/p' "/proc/$pid/status" 2>/dev/null)
    if [ -z "$state" ] || [ "$state" = Z ]; then exit 0; fi
    sleep 0.1
    i=$((i + 1))
done
kill -KILL "$pid" 2>/dev/null
exit 0
"""


class Monit(Tool):
    name = "monit"

    def start(self) -> None:
        root, ws = self.ws.root, self.ws
        binary = shutil.which("monit")
        if binary is None:
            raise ToolFailed("monit is not installed (Debian package monit)")
        check_paths(root, ws.redis_conf, ws.redis_bin, sys.executable, WEBAPP)
        stop = root / "stop.sh"
        stop.write_text(MONIT_STOP)
        start_webapp = root / "start-webapp.sh"  # monit waits for a start program to exit: it must daemonize
        start_webapp.write_text(f"#!/bin/sh\n{shlex.join(ws.webapp_argv())} "
                                f">>{root / 'webapp.log'} 2>&1 </dev/null &\n")
        for script in (stop, start_webapp):
            script.chmod(0o700)
        tenths = {name: round(g * 10) for name, g in GRACE.items()}
        control = f"""set daemon 1
set log {root / 'monit.log'}
set pidfile {root / 'monit.pid'}
set idfile {root / 'monit.id'}
set statefile {root / 'monit.state'}

check process redis matching "redis-server 127.0.0.1:{ws.redis_port}$"
    start program = "{ws.redis_bin} {ws.redis_conf} --daemonize yes --pidfile {root / 'redis.pid'}"
        with timeout {MONIT_START_TIMEOUT} seconds
    stop program = "{stop} {tenths['redis']}" with timeout {GRACE['redis'] + 10:g} seconds
    if failed host 127.0.0.1 port {ws.redis_port} protocol redis timeout 1 seconds for 2 cycles then restart

check process webapp matching "webapp.py --port {ws.webapp_port}$"
    start program = "{start_webapp}" with timeout {MONIT_START_TIMEOUT} seconds
    stop program = "{stop} {tenths['webapp']}" with timeout {GRACE['webapp'] + 10:g} seconds
    if failed host 127.0.0.1 port {ws.webapp_port} protocol http request "/health" timeout 1 seconds
       for 2 cycles then restart
"""
        path = root / "monitrc"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # monit refuses a looser mode
        with os.fdopen(fd, "w") as f:
            f.write(control)
        check = subprocess.run([binary, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30,
                               check=False)
        if check.returncode != 0:
            raise ToolFailed(f"monit -t: {check.stdout.strip()} {check.stderr.strip()}")
        self.spawn([binary, "-I", "-c", str(path)], root / "monit.out")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 10)


TOOL_CLASSES: dict[str, type[Tool]] = {"caretaker": Caretaker, "supervisord": Supervisord, "monit": Monit}


# --- incidents ----------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    key: str
    label: str
    service: str
    sig: signal.Signals


# In this order, round after round: the web app is frozen right after it was restarted
# (hence --min-age), but never killed right after a freeze, which a tool might still
# be handling (caretaker's receiver keeps a problem open until its alert resolves).
KINDS = {k.key: k for k in (Kind("redis-kill", "redis SIGKILL", "redis", signal.SIGKILL),
                            Kind("webapp-kill", "webapp SIGKILL", "webapp", signal.SIGKILL),
                            Kind("webapp-stop", "webapp SIGSTOP", "webapp", signal.SIGSTOP))}


@dataclass
class Result:
    tool: str
    kind: Kind
    heal: float | None
    needless: int
    extra: int


@dataclass
class Settings:
    deadline: float
    stable: float
    min_age: float
    settle_timeout: float


class Watch:
    """Which process serves each service, and since when (without a gap) it has been seen serving."""

    def __init__(self, services: dict[str, Service]) -> None:
        self.services = services
        self.current: dict[str, tuple[Ident, float] | None] = {}

    def note(self, name: str, ident: Ident | None) -> None:
        cur = self.current.get(name)
        if ident is None:
            self.current[name] = None
        elif cur is None or cur[0] != ident:
            self.current[name] = (ident, time.monotonic())

    def observe(self, timeout: float = 0.5) -> dict[str, Ident | None]:
        ids = {name: s.serving(timeout) for name, s in self.services.items()}
        for name, ident in ids.items():
            self.note(name, ident)
        return ids

    def serving_for(self, name: str) -> float:
        cur = self.current.get(name)
        return time.monotonic() - cur[1] if cur is not None else -1.0

    def settle(self, required: dict[str, float], timeout: float,
               see: Callable[[dict[str, Ident | None]], None] = lambda ids: None) -> bool:
        """True once each service has been served by the same process for its ``required`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            see(self.observe())
            if all(self.serving_for(name) >= seconds for name, seconds in required.items()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def required(services: Iterable[str], settings: Settings, target: str | None) -> dict[str, float]:
    """Serving time each service needs before the next incident: the service about to be
    broken ``--min-age`` (a tool may still be busy with its last repair, or not test a
    young process yet), the other ``--stable``."""
    return {name: max(settings.stable, settings.min_age) if name == target else settings.stable
            for name in services}


def run_incident(tool: Tool, kind: Kind, watch: Watch, settings: Settings, next_kind: Kind | None) -> Result:
    services = watch.services
    target = services[kind.service]
    (other,) = [s for name, s in services.items() if name != kind.service]
    before, other_before = target.serving(1.0), other.serving(1.0)
    if before is None or other_before is None:
        raise ToolFailed(f"{target.name if before is None else other.name} not serving before the incident")
    other_track, after = Track(other_before), Track()
    if not before.signal(kind.sig):
        raise ToolFailed(f"could not signal {target.name} (pid {before.pid})")
    t0 = time.monotonic()
    watch.note(target.name, None)
    heal = None
    while time.monotonic() - t0 < settings.deadline:
        # While the old process lives it holds the port, so no new one can answer: asking
        # then would only fill a frozen server's accept queue, which the tool's own probes meet.
        ident = target.serving(0.25) if before.state() in (None, "Z") else None
        if ident is not None and ident != before:  # a new process answers
            heal = time.monotonic() - t0
            after.see(ident)
            watch.note(target.name, ident)
            break
        other_ident = other.serving(0.2)
        other_track.see(other_ident)
        watch.note(other.name, other_ident)
        time.sleep(0.05)
    if heal is None and before.state() == "T":
        before.signal(signal.SIGCONT)  # not healed: resume the frozen process, as an operator would

    def see(ids: dict[str, Ident | None]) -> None:
        other_track.see(ids[other.name])
        if ids[target.name] != before:
            after.see(ids[target.name])

    # Watched until the next incident starts, so that restarts in between are counted too.
    need = required(services, settings, next_kind.service if next_kind else None)
    settled = watch.settle(need, settings.settle_timeout, see)
    result = Result(tool.name, kind, heal, other_track.restarts, after.restarts)
    new = f"pid {before.pid} -> {after.idents[0].pid}" if after.idents else f"pid {before.pid}"
    outcome = f"healed in {heal:6.2f} s" if heal is not None else f"TIMEOUT ({settings.deadline:g} s)"
    notes = [f"{other.name} restarted x{result.needless}"] if result.needless else []
    notes += [f"{target.name} restarted again x{result.extra}"] if result.extra else []
    print(f"  {tool.name:<11} {kind.label:<15} {outcome}  {new}  {'; '.join(notes)}".rstrip(), flush=True)
    if not settled:
        raise ToolFailed(f"services not serving steadily within {settings.settle_timeout:g} s after the incident")
    return result


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


def run_tool(name: str, kinds: list[Kind], incidents: int, settings: Settings, until: float,
             root: Path, redis_bin: str, results: list[Result], notes: list[str]) -> None:
    """Run one tool's incidents, adding to ``results`` and ``notes`` as they come (kept if interrupted)."""
    ws = Workspace(root / name, redis_bin, free_port(), free_port())
    ws.root.mkdir()
    ws.write_redis_conf()
    services = {"redis": Service("redis", ws.redis_port, redis_pid),
                "webapp": Service("webapp", ws.webapp_port, webapp_pid)}
    tool = TOOL_CLASSES[name](ws)
    print(f"{name}: starting (redis 127.0.0.1:{ws.redis_port}, webapp 127.0.0.1:{ws.webapp_port})", flush=True)
    reaper: Reaper | None = None
    try:
        tool.start()
        if not isinstance(tool, Caretaker):  # the stack's Popen children (its first Redis, web app) are its to reap
            reaper = Reaper(tool.own_pids())
            reaper.start()
        watch = Watch(services)
        planned = [kind for _ in range(incidents) for kind in kinds]
        first = {n: max(t, 3.0) for n, t in required(services, settings, planned[0].service).items()}
        if not watch.settle(first, 60.0):
            raise ToolFailed("the services are not serving steadily 60 s after the start")
        for i, kind in enumerate(planned):
            if time.monotonic() > until:
                notes.append(f"{name}: time limit reached, {len(planned) - i} incidents not run")
                break
            next_kind = planned[i + 1] if i + 1 < len(planned) else None
            results.append(run_incident(tool, kind, watch, settings, next_kind))
            problem = tool.problem()
            if problem:
                raise ToolFailed(problem)
    except Exception as err:
        notes.append(f"{name}: stopped early: {err}")
        print(f"{name}: FAILED: {err}", file=sys.stderr, flush=True)
        for log in tool.logs():
            sys.stderr.write(f"--- {log} (tail)\n{tail(log)}")
    finally:
        print(f"{name}: stopping", flush=True)
        if reaper is not None:
            reaper.stop()
        try:
            tool.stop()
        finally:
            # Whatever the tool started and left: the services' processes seen serving, and
            # orphans adopted by this subreaper. Each by pid, checked against its start time.
            leftovers = {i for s in services.values() for i in s.seen} | set(our_children())
            terminate(leftovers)
            left = [i for i in leftovers if i.state() not in (None, "Z")]
            if left:
                notes.append(f"{name}: could not stop pids {', '.join(str(i.pid) for i in left)}")


def table(results: list[Result], tools: list[str], kinds: list[Kind], deadline: float) -> str:
    head = (f"{'tool':<11} | {'incident':<15} | {'n':>2} | {'median s':>8} | {'worst s':>7} | {'timeouts':>8} | "
            f"{'needless restarts':>17} | {'extra restarts':>14}")
    lines = [head, "-" * len(head)]
    for tool in tools:
        for kind in kinds:
            rows = [r for r in results if r.tool == tool and r.kind == kind]
            if not rows:
                continue
            healed = [r.heal for r in rows if r.heal is not None]
            median = f"{statistics.median(healed):8.2f}" if healed else f"{'-':>8}"
            worst = f"{max(healed):7.2f}" if healed else f"{'-':>7}"
            lines.append(f"{tool:<11} | {kind.label:<15} | {len(rows):>2} | {median} | {worst} | "
                         f"{len(rows) - len(healed):>8} | {sum(r.needless for r in rows):>17} | "
                         f"{sum(r.extra for r in rows):>14}")
    lines.append(f"heal = signal sent -> first answer from a new process (redis PING, webapp GET /health 200); "
                 f"timeout = none within {deadline:g} s")
    return "\n".join(lines)


def names(value: str, allowed: Iterable[str]) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(allowed)} (comma-separated), not {value!r}")
    return list(dict.fromkeys(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--incidents", type=int, default=5, help="per tool and kind (default: %(default)s)")
    parser.add_argument("--tools", type=lambda v: names(v, TOOLS), default=list(TOOLS),
                        help=f"comma-separated, of {','.join(TOOLS)} (default: all)")
    parser.add_argument("--kinds", type=lambda v: names(v, KINDS), default=list(KINDS),
                        help=f"comma-separated, of {','.join(KINDS)} (default: all)")
    parser.add_argument("--deadline", type=float, default=30.0,
                        help="seconds after which an incident counts as a timeout (default: %(default)s)")
    parser.add_argument("--stable", type=float, default=2.0,
                        help="seconds both services must serve unchanged between incidents (default: %(default)s)")
    parser.add_argument("--min-age", type=float, default=5.0,
                        help="seconds the service about to be broken must have served from the same process "
                             "(default: %(default)s)")
    parser.add_argument("--settle-timeout", type=float, default=30.0,
                        help="at most this long to get there, else the tool's run stops (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=570.0,
                        help="seconds after which no incident is started, shared among the tools "
                             "(default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args()
    if not 1 <= args.incidents <= 50 or not 1 <= args.deadline <= 300 or not 0 < args.stable <= 60 \
            or not 0 <= args.min_age <= 60 or not 1 <= args.settle_timeout <= 300 \
            or not 10 <= args.time_limit <= 7200:
        parser.error("bounded: --incidents 1..50, --deadline 1..300, --stable 0..60, --min-age 0..60, "
                     "--settle-timeout 1..300, --time-limit 10..7200")
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("needs redis-server (Debian package redis-server)")

    def on_signal(signum: int, frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the first one stops the run; cleanup is not cut short
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if not become_subreaper():
        print("note: not a child subreaper; leftovers are found by the pids seen serving only", file=sys.stderr)
    kinds = [kind for key, kind in KINDS.items() if key in args.kinds]
    settings = Settings(args.deadline, args.stable, args.min_age, args.settle_timeout)
    root = Path(tempfile.mkdtemp(prefix="caretaker-heal-"))
    start = time.monotonic()
    results: list[Result] = []
    notes: list[str] = []
    print(f"{args.incidents} incidents per tool and kind; {os.cpu_count()} CPUs; work dir {root}", flush=True)
    try:
        order = [t for t in RUN_ORDER if t in args.tools]
        for n, name in enumerate(order):
            left = start + args.time_limit - time.monotonic()
            until = time.monotonic() + max(0.0, left) / (len(order) - n)
            run_tool(name, kinds, args.incidents, settings, until, root, redis_bin, results, notes)
    except KeyboardInterrupt:
        notes.append("interrupted: the table has the incidents run so far")
    finally:
        if args.keep:
            print(f"kept {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - start:.0f} s\n")
    print(table(results, args.tools, kinds, args.deadline))
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
