"""The local stack: the watched services, caretaker's two programs, Prometheus and
Alertmanager, all on 127.0.0.1. ``make run`` runs ``python -m demo.stack``; the
end-to-end tests drive the same :class:`Stack` on free ports.

Prometheus and Alertmanager get their configs rendered from the shipped ones in
``prometheus/`` into the run directory, with only the addresses changed (and the
token path made absolute), so the stack tests the files users deploy.

:class:`Fleet` is several hosts on one machine (docs/fleet.md): a :class:`Stack` per
host without Prometheus and Alertmanager, one Prometheus scraping every host with a
``host`` label per target (``prometheus/fleet/prometheus.yml``, file-based discovery),
and two Alertmanagers clustered with each other, routing each host's repairs to its
receiver (``scripts/fleet-alertmanager.py``).

Stopping: every program the stack started runs in its own process group and is
stopped by group (SIGTERM, then SIGKILL after a grace period); the watched services,
which caretaker may have restarted since, are found by the config's ``match`` and
stopped by pid. Nothing is ever stopped by name.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from demo.incidents import run_incidents
from exporter.config import Config, ConfigError, ExecProbe, HttpProbe, Probe, dependency_order, load_config
from exporter.procfs import ProcReader, scan_services
from receiver.process import send_signal, start_service

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "prometheus"
BINARIES = {"prometheus": ("prometheus",), "alertmanager": ("prometheus-alertmanager", "alertmanager"),
            "redis-server": ("redis-server",)}
DEBIAN_PACKAGES = {"prometheus": "prometheus", "alertmanager": "prometheus-alertmanager",
                   "redis-server": "redis-server"}


class StackError(Exception):
    pass


def find_binaries(needed: tuple[str, ...] = tuple(BINARIES)) -> dict[str, str]:
    """Paths of the programs the stack runs; ``StackError`` says what to install."""
    found, missing = {}, []
    for name in needed:
        path = next((p for p in (shutil.which(c) for c in BINARIES[name]) if p), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        packages = " ".join(DEBIAN_PACKAGES[m] for m in missing)
        raise StackError(f"missing programs: {', '.join(missing)}. Install them with:\n"
                         f"  sudo apt-get install --no-install-recommends {packages}")
    return found


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _describe_probe(probe: Probe) -> str:
    if isinstance(probe, HttpProbe):
        return probe.url
    if isinstance(probe, ExecProbe):
        return f"exec {' '.join(probe.argv)}"
    return f"{probe.type} {probe.host}:{probe.port}"


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    url: str


def spawn(children: list[Child], run_dir: Path, name: str, argv: list[str], url: str) -> None:
    """Start ``argv`` in a process group of its own, output to ``run_dir/logs/NAME.log``;
    ``url`` answers 200 once it is ready."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)
    children.append(Child(name, proc, url))


def wait_ready(children: Sequence[Child], run_dir: Path, timeout: float) -> None:
    """Wait until every child answers at its URL; ``StackError`` if one exits or the time is up."""
    deadline = time.monotonic() + timeout
    for child in children:
        while not http_ok(child.url):
            if child.proc.poll() is not None:
                raise StackError(f"{child.name} exited with status {child.proc.returncode}; see "
                                 f"{run_dir / 'logs' / (child.name + '.log')}")
            if time.monotonic() > deadline:
                raise StackError(f"{child.name} not ready at {child.url} within {timeout:g}s")
            time.sleep(0.1)


def stop_children(children: list[Child], grace: float) -> None:
    """SIGTERM to each child's process group, SIGKILL to what is left after ``grace`` seconds."""
    for child in reversed(children):
        if child.proc.poll() is None:
            try:
                os.killpg(child.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for child in reversed(children):
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.proc.wait(5)
    children.clear()


def prometheus_argv(binary: str, config: Path, port: int, data: Path) -> list[str]:
    return [binary, f"--config.file={config}", f"--storage.tsdb.path={data}", "--storage.tsdb.retention.time=2d",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]


def alertmanager_argv(binary: str, config: Path, port: int, data: Path, cluster: Sequence[str] = ()) -> list[str]:
    """Alertmanager on 127.0.0.1; ``cluster`` its ``--cluster.*`` flags (none: clustering off)."""
    return [binary, f"--config.file={config}", f"--storage.path={data}", f"--web.listen-address=127.0.0.1:{port}",
            *(cluster or ["--cluster.listen-address="]), "--log.level=warn"]


def override_routes(am: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set ``overrides`` (group_interval, repeat_interval...) on the top route, and on each
    child route that sets that key itself."""
    for route in [am["route"], *am["route"].get("routes", [])]:
        for key, value in overrides.items():
            if route is am["route"] or key in route:
                route[key] = value


@dataclass
class Stack:
    config_path: Path
    run_dir: Path
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    python: str = sys.executable
    alertmanager_overrides: dict[str, Any] = field(default_factory=dict)
    alertmanager_args: tuple[str, ...] = ()
    """More flags for both Alertmanagers, after the cluster ones (``--cluster.peer-timeout=0s``:
    both members notify at once, where the second would wait for the first's gossip)."""
    children: list[Child] = field(default_factory=list)
    services: list[subprocess.Popen[bytes]] = field(default_factory=list)
    """Services this stack started (reaped in :meth:`stop`)."""

    def __post_init__(self) -> None:
        self.config_path = Path(self.config_path).resolve()
        self.run_dir = Path(self.run_dir).resolve()
        self.config: Config = load_config(self.config_path)
        self.binaries = find_binaries()

    # --- set-up -----------------------------------------------------------------
    @property
    def token_path(self) -> Path | None:
        secret = self.config.receiver.bearer_token
        return self.config.resolve(secret.file) if secret is not None and secret.file else None

    def ensure_token(self) -> None:
        """Write a random receiver token if the config names a token file that is missing."""
        path = self.token_path
        if path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")

    def render_assets(self) -> tuple[Path, Path]:
        """prometheus.yml and alertmanager.yml for this stack, in the run directory."""
        out = self.run_dir / "prometheus"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ASSETS / "rules", out / "rules")
        exp, recv = self.config.exporter, self.config.receiver
        prom = yaml.safe_load((ASSETS / "prometheus.yml").read_text())
        prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{self.alertmanager_port}"]
        for job in prom["scrape_configs"]:
            port = exp.port if job["job_name"] == "caretaker-exporter" else recv.port
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
        am = yaml.safe_load((ASSETS / "alertmanager.yml").read_text())
        hook = next(r for r in am["receivers"] if r["name"] == "caretaker")["webhook_configs"][0]
        hook["url"] = f"http://127.0.0.1:{recv.port}/alerts"
        if self.token_path is not None:
            hook["http_config"]["authorization"]["credentials_file"] = str(self.token_path)
        else:
            del hook["http_config"]
        override_routes(am, self.alertmanager_overrides)
        (out / "prometheus.yml").write_text(yaml.safe_dump(prom, sort_keys=False))
        (out / "alertmanager.yml").write_text(yaml.safe_dump(am, sort_keys=False))
        return out / "prometheus.yml", out / "alertmanager.yml"

    def check_ports(self) -> None:
        busy = [f"{what} ({port})" for what, port in self.ports().items() if not port_free(port)]
        if busy:
            raise StackError(f"ports already in use on 127.0.0.1: {', '.join(busy)}. Stop what holds them "
                             "(an earlier `make run`?) or change the ports.")

    def ports(self) -> dict[str, int]:
        return {"exporter": self.config.exporter.port, "receiver": self.config.receiver.port,
                "prometheus": self.prometheus_port, "alertmanager": self.alertmanager_port}

    # --- processes --------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], url: str) -> None:
        spawn(self.children, self.run_dir, name, argv, url)

    def start_services(self, dependency_wait: float = 10.0) -> list[str]:
        """Start each watched service that has a start command and is not running, in
        dependency order (``depends_on``): a dependent waits, up to ``dependency_wait``
        seconds, until what it depends on runs its processes."""
        running = scan_services(ProcReader(), self.config.services, (os.getpid(),), with_fds=False)
        started = []
        for name in dependency_order(self.config):
            cfg = self.config.services[name]
            if cfg.start is None or len(running[name]) >= max(cfg.processes.min, 1):
                continue
            deadline = time.monotonic() + dependency_wait
            deps = {dep: self.config.services[dep] for dep in cfg.depends_on}
            while deps and time.monotonic() < deadline:
                now = scan_services(ProcReader(), deps, (os.getpid(),), with_fds=False)
                if all(len(now[d]) >= deps[d].processes.min for d in deps):
                    break
                time.sleep(0.1)
            child = start_service(self.config, name)
            self.services.append(child)
            started.append(f"{name} (pid {child.pid})")
        return started

    def start(self) -> None:
        self.check_ports()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ensure_token()
        prom_yml, am_yml = self.render_assets()
        self.start_caretaker()
        self._spawn("alertmanager", alertmanager_argv(self.binaries["alertmanager"], am_yml, self.alertmanager_port,
                                                      self.run_dir / "alertmanager-data"),
                    f"http://127.0.0.1:{self.alertmanager_port}/-/ready")
        self._spawn("prometheus", prometheus_argv(self.binaries["prometheus"], prom_yml, self.prometheus_port,
                                                  self.run_dir / "prometheus-data"),
                    f"http://127.0.0.1:{self.prometheus_port}/-/ready")

    def start_caretaker(self) -> None:
        """The watched services that are not running, the exporter and the receiver."""
        self.start_services()
        cfg = str(self.config_path)
        exp, recv = self.config.exporter, self.config.receiver
        self._spawn("exporter", [self.python, "-m", "exporter.app", "--config", cfg],
                    f"http://127.0.0.1:{exp.port}/metrics")
        self._spawn("receiver", [self.python, "-m", "receiver.app", "--config", cfg],
                    f"http://127.0.0.1:{recv.port}/-/healthy")

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_ready(self.children, self.run_dir, timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Stop what the stack started, then the config's services (found by match)."""
        stop_children(self.children, grace)
        self.stop_services(grace)

    def stop_services(self, grace: float = 5.0) -> None:
        reader = ProcReader()
        found = scan_services(reader, self.config.services, (os.getpid(),), with_fds=False)
        procs = [p for ps in found.values() for p in ps]
        for p in procs:
            if p.state == "T":  # a frozen demo service cannot act on SIGTERM
                send_signal(reader, [p], signal.SIGCONT)
        send_signal(reader, procs, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while True:
            left = [p for ps in scan_services(reader, self.config.services, (os.getpid(),), with_fds=False).values()
                    for p in ps]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        send_signal(reader, left, signal.SIGKILL)
        self.reap_services(wait=2.0)

    def reap_services(self, wait: float = 0.0) -> None:
        """Collect the exit status of services this stack started that have exited."""
        for child in self.services:
            try:
                child.wait(wait) if wait else child.poll()
            except subprocess.TimeoutExpired:
                pass
        self.services = [c for c in self.services if c.returncode is None]

    def describe(self) -> str:
        lines = ["caretaker local stack is up:"]
        for name, cfg in self.config.services.items():
            probes = ", ".join(_describe_probe(p) for p in cfg.probes)
            lines.append(f"  service {name:<14} {probes}")
        lines += [
            f"  exporter               http://127.0.0.1:{self.config.exporter.port}/metrics",
            f"  receiver               http://127.0.0.1:{self.config.receiver.port}/alerts "
            f"(audit: /api/v1/remediations)",
            f"  prometheus             http://127.0.0.1:{self.prometheus_port}/alerts",
            f"  alertmanager           http://127.0.0.1:{self.alertmanager_port}/",
            f"  logs                   {self.run_dir / 'logs'}",
            "Break something: `make demo` in another terminal, or `kill -9` / `kill -STOP` a service.",
            "Ctrl+C stops everything.",
        ]
        return "\n".join(lines)


FLEET_PROMETHEUS = ASSETS / "fleet" / "prometheus.yml"
FLEET_ALERTMANAGER = REPO / "scripts" / "fleet-alertmanager.py"


@dataclass
class Fleet:
    """Several hosts on one machine: each host's :class:`Stack` runs its services,
    exporter and receiver (its Prometheus and Alertmanager ports are not used), and the
    fleet runs one Prometheus and a pair of clustered Alertmanagers for all of them.

    ``hosts`` maps a host's name (its ``receiver.host``, the ``host`` label of its
    targets) to its stack; every host's receiver needs a bearer token. Prometheus's
    config is ``prometheus/fleet/prometheus.yml`` with its intervals set to ``interval``
    and its target files written here; Alertmanager's is what
    ``scripts/fleet-alertmanager.py`` makes of ``prometheus/alertmanager.yml``, with
    ``alertmanager_overrides`` applied to its routes.
    """

    hosts: dict[str, Stack]
    run_dir: Path
    prometheus_port: int
    alertmanager_ports: tuple[int, int]
    cluster_ports: tuple[int, int]
    """The Alertmanagers' gossip ports (--cluster.listen-address), each the other's peer."""
    interval: str = "1s"
    python: str = sys.executable
    alertmanager_overrides: dict[str, Any] = field(default_factory=dict)
    alertmanager_args: tuple[str, ...] = ()
    """More flags for both Alertmanagers, after the cluster ones (``--cluster.peer-timeout=0s``:
    both members notify at once, where the second would wait for the first's gossip)."""
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        self.binaries = find_binaries(("prometheus", "alertmanager"))
        for name, stack in self.hosts.items():
            if stack.config.receiver.host != name or stack.token_path is None:
                raise StackError(f"host {name}: its config needs receiver.host {name} and a receiver.bearer_token")

    def render_prometheus(self) -> Path:
        """prometheus.yml and the file_sd target files (a ``host`` label each) in the run directory."""
        out = self.run_dir / "prometheus"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(ASSETS / "rules", out / "rules")
        prom = yaml.safe_load(FLEET_PROMETHEUS.read_text())
        prom["global"].update(scrape_interval=self.interval, scrape_timeout=self.interval,
                              evaluation_interval=self.interval)
        prom["rule_files"] = [str(out / "rules" / "*.yml")]
        prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
            f"127.0.0.1:{port}" for port in self.alertmanager_ports]
        (out / "targets").mkdir()
        for job in prom["scrape_configs"]:
            exporter = job["job_name"] == "caretaker-exporter"
            groups = [{"targets": [f"127.0.0.1:{s.config.exporter.port if exporter else s.config.receiver.port}"],
                       "labels": {"host": name}} for name, s in self.hosts.items()]
            path = out / "targets" / f"{job['job_name']}.yml"
            path.write_text(yaml.safe_dump(groups, sort_keys=False))
            job["file_sd_configs"][0]["files"] = [str(path)]
        (out / "prometheus.yml").write_text(yaml.safe_dump(prom, sort_keys=False))
        return out / "prometheus.yml"

    def render_alertmanager(self) -> Path:
        """alertmanager.yml from scripts/fleet-alertmanager.py: a route and receiver per host."""
        out = self.run_dir / "alertmanager"
        out.mkdir(parents=True, exist_ok=True)
        hosts = {name: {"urls": [f"http://127.0.0.1:{s.config.receiver.port}/alerts"],
                        "credentials_file": str(s.token_path)} for name, s in self.hosts.items()}
        (out / "hosts.yml").write_text(yaml.safe_dump({"hosts": hosts}, sort_keys=False))
        result = subprocess.run([self.python, str(FLEET_ALERTMANAGER), str(out / "hosts.yml")], capture_output=True,
                                text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise StackError(f"scripts/fleet-alertmanager.py failed: {result.stderr.strip()}")
        am = yaml.safe_load(result.stdout)
        override_routes(am, self.alertmanager_overrides)
        (out / "alertmanager.yml").write_text(yaml.safe_dump(am, sort_keys=False))
        return out / "alertmanager.yml"

    def start(self) -> None:
        for stack in self.hosts.values():
            stack.run_dir.mkdir(parents=True, exist_ok=True)
            stack.ensure_token()
            stack.start_caretaker()
        prom_yml, am_yml = self.render_prometheus(), self.render_alertmanager()
        (first, second), (gossip1, gossip2) = self.alertmanager_ports, self.cluster_ports
        for i, (port, mine, peer) in enumerate(((first, gossip1, gossip2), (second, gossip2, gossip1)), 1):
            # Gossip on loopback: the advertised address must be given (no private address to pick),
            # and a short settle time lets the pair notify within seconds of starting.
            cluster = [f"--cluster.listen-address=127.0.0.1:{mine}", f"--cluster.advertise-address=127.0.0.1:{mine}",
                       f"--cluster.peer=127.0.0.1:{peer}", "--cluster.settle-timeout=2s",
                       "--cluster.pushpull-interval=5s", *self.alertmanager_args]
            spawn(self.children, self.run_dir, f"alertmanager-{i}",
                  alertmanager_argv(self.binaries["alertmanager"], am_yml, port, self.run_dir / f"alertmanager-{i}",
                                    cluster), f"http://127.0.0.1:{port}/-/ready")
        spawn(self.children, self.run_dir, "prometheus",
              prometheus_argv(self.binaries["prometheus"], prom_yml, self.prometheus_port,
                              self.run_dir / "prometheus-data"), f"http://127.0.0.1:{self.prometheus_port}/-/ready")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for stack in self.hosts.values():
            stack.wait_ready(max(1.0, deadline - time.monotonic()))
        wait_ready(self.children, self.run_dir, max(1.0, deadline - time.monotonic()))

    def stop(self, grace: float = 5.0) -> None:
        """Stop Prometheus and the Alertmanagers, then every host's stack."""
        try:
            stop_children(self.children, grace)
        finally:
            for stack in self.hosts.values():
                stack.stop(grace)

    def logs(self) -> list[Path]:
        return sorted([*(self.run_dir / "logs").glob("*.log"),
                       *(p for s in self.hosts.values() for p in (s.run_dir / "logs").glob("*.log"))])


def main() -> None:
    parser = argparse.ArgumentParser(description="Run caretaker's local stack.")
    parser.add_argument("--config", default=str(REPO / "caretaker.yml"))
    parser.add_argument("--run-dir", default=str(REPO / ".run"))
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    parser.add_argument("--demo", action="store_true", help="run the incidents demo once the stack is up, then stop")
    args = parser.parse_args()
    try:
        stack = Stack(Path(args.config), Path(args.run_dir), prometheus_port=args.prometheus_port,
                      alertmanager_port=args.alertmanager_port)
    except ConfigError as err:
        print(f"caretaker stack: invalid configuration:\n{err}", file=sys.stderr)
        raise SystemExit(2) from err
    except StackError as err:
        print(f"caretaker stack: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    try:
        stack.start()
        stack.wait_ready()
    except StackError as err:
        print(f"caretaker stack: {err}", file=sys.stderr)
        stack.stop()
        raise SystemExit(1) from err
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # Both explicitly: a stack started from a script may inherit SIGINT as ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(stack.describe(), flush=True)
    try:
        if args.demo:
            time.sleep(3)  # let Prometheus see the healthy state first
            raise SystemExit(run_incidents(stack.config))
        while True:
            for child in stack.children:
                if child.proc.poll() is not None:
                    print(f"caretaker stack: {child.name} exited with status {child.proc.returncode}; stopping",
                          file=sys.stderr)
                    raise SystemExit(1)
            stack.reap_services()
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
        print("stopped: no process of the stack is left running.", flush=True)


if __name__ == "__main__":
    main()
