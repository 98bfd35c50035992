"""caretaker's configuration: one YAML file (``caretaker.yml``) for both programs.

Pipeline: YAML (safe loader, with line numbers kept) -> pydantic models with
``extra="forbid"`` -> cross-checks -> a frozen :class:`Config` the rest of the code
uses. Every problem is reported with its place in the file, e.g.::

    caretaker.yml: services.redis.probes[0].timeout (line 14): must not be negative

and :func:`load_config` raises :class:`ConfigError` carrying all problems at once.
Durations are Prometheus-style strings (``500ms``, ``10s``, ``1m30s``) or plain
numbers of seconds. Secrets (tokens) are never inline: they are read from a file
or an environment variable named in the config.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "Config",
    "ConfigError",
    "ExecProbe",
    "FileCheck",
    "HealthWeights",
    "Heartbeat",
    "HttpProbe",
    "LogWatch",
    "PostgresProbe",
    "Probe",
    "RedisProbe",
    "Secret",
    "ServiceConfig",
    "Start",
    "TcpProbe",
    "load_config",
    "parse_config",
]

DEFAULT_EXPORTER_PORT = 8930
DEFAULT_RECEIVER_PORT = 8931
REMEDIATION_ACTIONS = ("restart", "stop_duplicates", "free_port", "rotate_logs", "clean", "ensure_paths",
                       "restore_file", "vacuum", "http", "exec", "signal")
"""Repairs the receiver knows. A service may allow only these."""
Action = Literal["restart", "stop_duplicates", "free_port", "rotate_logs", "clean", "ensure_paths", "restore_file",
                 "vacuum", "http", "exec", "signal"]

_NAME_RE = r"^[a-zA-Z_][a-zA-Z0-9_.-]*$"
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h|d))+$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` holds one ``place: message`` each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def parse_duration(value: Any) -> Any:
    """Turn ``"1m30s"``, ``"250ms"`` or a number into seconds (float).

    Negative values are left for the ``ge=0`` constraint to reject with a clear
    message; anything that is not a duration raises ``ValueError``.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 500ms or 1m30s")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            return -1.0 * float(parse_duration(text[1:]))
        if _DURATION_RE.fullmatch(text):
            return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))
    raise ValueError(f"{value!r} is not a duration (use e.g. 10s, 500ms, 1m30s, or seconds)")


def _check_regex(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected a regular expression string")
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"invalid regular expression {value!r}: {err}") from err
    return value


def _parse_signal(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value).name
        except ValueError as err:
            raise ValueError(f"{value} is not a signal number") from err
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in signal.Signals.__members__:
            return name
    raise ValueError(f"{value!r} is not a signal name (e.g. SIGTERM, SIGINT, SIGHUP)")


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveSeconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Regex = Annotated[str, BeforeValidator(_check_regex)]
SignalName = Annotated[str, BeforeValidator(_parse_signal)]
Name = Annotated[str, Field(pattern=_NAME_RE, max_length=100)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Model):
    """How to find a service's processes; every given regex must match (search)."""

    comm: Regex | None = None
    """Regex on the kernel's process name (``/proc/PID/comm``, at most 15 chars)."""
    exe: Regex | None = None
    """Regex on the executable path (``/proc/PID/exe``)."""
    cmdline: Regex | None = None
    """Regex on the command line, arguments joined by single spaces."""
    pidfile: str | None = None
    """File whose first line is the pid of the service's main process (relative to the
    config file's directory). Without regexes, it finds that one process (if it runs).
    With regexes, the regexes find the processes and the pidfile only names the one
    that ``stop_duplicates`` keeps first, so a second copy started by hand is still seen."""
    port: Port | None = None
    """TCP port the service listens on (IPv4 or IPv6). Without regexes, the service's
    processes are those holding that listening socket (a server and the workers that
    share its socket), whoever they are: a squatter on the port counts as the service,
    so add a regex where that matters. With regexes, the holders are only kept first by
    ``stop_duplicates``."""

    @model_validator(mode="after")
    def _one_at_least(self) -> Match:
        if not self.by_regex and self.pidfile is None and self.port is None:
            raise ValueError("give at least one of comm, exe, cmdline, pidfile, port")
        return self

    @property
    def by_regex(self) -> bool:
        return self.comm is not None or self.exe is not None or self.cmdline is not None


class Processes(_Model):
    min: int = Field(default=1, ge=0)
    max: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Processes:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is less than min ({self.min})")
        return self


class _ProbeBase(_Model):
    name: Name
    timeout: PositiveSeconds = 2.0


class HttpProbe(_ProbeBase):
    """Request a URL; success when the status is expected and the body matches.

    For ``https`` URLs the server certificate's expiry is reported too.
    """

    type: Literal["http"]
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    method: Literal["GET", "HEAD", "POST"] = "GET"
    expect_status: tuple[Annotated[int, Field(ge=100, le=599)], ...] = (200,)
    body_regex: Regex | None = None
    """Searched in the first MiB of the body."""
    ca_file: str | None = None
    insecure_skip_verify: bool = False


class TcpProbe(_ProbeBase):
    """Open a TCP connection; optionally send a line and expect a reply (regex)."""

    type: Literal["tcp"]
    host: str = "127.0.0.1"
    port: Port
    send: str | None = None
    expect: Regex | None = None


class Secret(_Model):
    """A secret read from a file (first line, stripped) or an environment variable."""

    file: str | None = None
    env: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Secret:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file, env")
        return self


class RedisProbe(_ProbeBase):
    """``PING`` a Redis server (redis-py), optionally with a password and TLS."""

    type: Literal["redis"]
    host: str = "127.0.0.1"
    port: Port = 6379
    username: str | None = None
    password: Secret | None = None
    tls: bool = False
    ca_file: str | None = None


class PostgresProbe(_ProbeBase):
    """Connect and run ``SELECT 1`` (asyncpg, so SCRAM authentication works)."""

    type: Literal["postgres"]
    host: str = "127.0.0.1"
    port: Port = 5432
    user: str = "postgres"
    database: str = "postgres"
    password: Secret | None = None
    tls: Literal["disable", "prefer", "require", "verify-full"] = "prefer"


class ExecProbe(_ProbeBase):
    """Run argv (never a shell); success when it exits with an expected status in time."""

    type: Literal["exec"]
    argv: Annotated[tuple[str, ...], Field(min_length=1)]
    expect_exit: tuple[int, ...] = (0,)
    cwd: str | None = None


Probe = Annotated[HttpProbe | TcpProbe | RedisProbe | PostgresProbe | ExecProbe, Field(discriminator="type")]
PROBE_TYPES = ("http", "tcp", "redis", "postgres", "exec")


class Heartbeat(_Model):
    """A watchdog the app feeds with ``POST /heartbeat/NAME`` on the exporter."""

    name: Name
    timeout: PositiveSeconds
    """Seconds without a heartbeat after which it counts as missing."""


class LogPattern(_Model):
    name: Name
    regex: Regex
    severity: Literal["critical", "error", "warning", "info"] = "error"


class LogWatch(_Model):
    """A log file to follow; matches of each pattern are counted."""

    path: str
    patterns: tuple[LogPattern, ...] = ()
    default_patterns: bool | tuple[str, ...] = True
    """``true`` for the whole default pack, or the names of the ones to use."""


class FileCheck(_Model):
    """A file that must exist, maybe parse, be fresh, and have a mode/owner."""

    path: str
    format: Literal["json", "yaml"] | None = None
    max_age: PositiveSeconds | None = None
    mode: Annotated[str, Field(pattern=r"^0?[0-7]{3,4}$")] | None = None
    owner: str | None = None
    group: str | None = None
    backups: int = Field(default=0, ge=0, le=100)
    """Valid copies the receiver keeps for ``restore_file`` (0: none)."""
    max_parse_bytes: int = Field(default=16 * 1024 * 1024, ge=1, le=1024 * 1024 * 1024)
    """A larger file is not parsed: reported as not checked, never as corrupt (parsing
    takes memory of several times the file's size, in both programs)."""
    default: str | None = None
    """A file to restore from when no valid backup exists."""


class DirectoryCheck(_Model):
    path: str
    mode: Annotated[str, Field(pattern=r"^0?[0-7]{3,4}$")] | None = None


class Supervisor(_Model):
    """A program run by supervisord; restarted with ``supervisorctl [-c CONFIG] restart PROGRAM``."""

    program: Name
    config: str | None = None


EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200)]


class ResourceLimits(_Model):
    """Resource limits of an argv-started service (soft and hard), as systemd's
    ``LimitNOFILE=`` and friends; unset: inherited from the receiver."""

    nofile: int | None = Field(default=None, ge=0)
    """Open file descriptors."""
    nproc: int | None = Field(default=None, ge=0)
    """Processes (threads count) of the service's user."""
    core: int | None = Field(default=None, ge=0)
    """Core file size, bytes (0: no core dumps)."""


def _account_exists(value: Any, kind: str) -> Any:
    import grp  # noqa: PLC0415 - only here, for a field few configs use
    import pwd  # noqa: PLC0415

    if value is None:
        return value
    lookup = (pwd.getpwuid, pwd.getpwnam) if kind == "user" else (grp.getgrgid, grp.getgrnam)
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            lookup[0](value)
        elif isinstance(value, str) and value:
            lookup[1](value)
        else:
            raise ValueError(f"expected a {kind} name or id")
    except KeyError as err:
        raise ValueError(f"no {kind} {value!r} on this machine") from err
    return value


class Start(_Model):
    """How to (re)start a service: argv (never a shell), a systemd unit, or a supervisord program.

    An argv-started service runs as systemd would run it: as ``user``/``group`` (with the
    user's supplementary groups, and HOME, USER, LOGNAME set), with ``umask`` and
    ``limits``, in a session of its own, and with a clean environment: PATH and LANG,
    the variables named in ``inherit_env`` (copied from the receiver's), and ``env``
    (values given, or read from a file or another variable). Nothing else of the
    receiver's environment reaches it: not its token, not its passwords."""

    argv: Annotated[tuple[str, ...], Field(min_length=1)] | None = None
    cwd: str | None = None
    env: dict[EnvName, str | Secret] = Field(default_factory=dict)
    """Variables for the service: ``NAME: value``, or ``NAME: {file: path}`` / ``{env: VAR}``."""
    inherit_env: tuple[EnvName, ...] = ()
    """Names of the receiver's environment variables the service gets as they are."""
    user: Annotated[str | int, BeforeValidator(lambda v: _account_exists(v, "user"))] | None = None
    """Run as this user (name or uid). The receiver must run as root, or as that user."""
    group: Annotated[str | int, BeforeValidator(lambda v: _account_exists(v, "group"))] | None = None
    """Primary group (name or gid); default: the user's."""
    umask: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] | None = None
    """e.g. ``"027"``; default ``"022"`` (systemd's), whatever the receiver's own."""
    limits: ResourceLimits = ResourceLimits()
    log_file: str | None = None
    """Standard output and error of an argv-started process go here (appended)."""
    systemd_unit: Annotated[str, Field(pattern=r"^[A-Za-z0-9@_.:-]+$")] | None = None
    supervisor: Supervisor | None = None
    timeout: PositiveSeconds = 60.0
    """For systemctl/supervisorctl: how long the command may take."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Start:
        given = [k for k in ("argv", "systemd_unit", "supervisor") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of argv, systemd_unit, supervisor")
        if self.argv is None and (self.user is not None or self.group is not None or self.umask is not None
                                  or self.limits != ResourceLimits() or self.env or self.inherit_env):
            raise ValueError("user, group, umask, limits, env and inherit_env are for argv; a systemd unit or "
                             "supervisord program sets its own")
        return self


class Stop(_Model):
    signal: SignalName = "SIGTERM"
    grace_period: Seconds = 10.0
    """Seconds to wait after ``signal`` before SIGKILL."""
    leftovers: bool = True
    """Before a start, stop what is left of the previous incarnation (its children and
    session members that outlived it), as systemd's control-group kill does. ``false``
    for a service whose children must outlive it (sshd's sessions, tmux), as
    ``KillMode=process``."""


class RotateLogs(_Model):
    """``rotate_logs``: the service's log files (``logs`` and ``start.log_file``)."""

    keep: int = Field(default=5, ge=1, le=100)
    compress: bool = True
    copytruncate: bool = False
    """Copy then truncate, for writers that cannot reopen their log."""
    reopen_signal: SignalName | None = None
    """Sent to the service after a rename so it reopens its log (e.g. SIGHUP, SIGUSR1)."""


class CleanRule(_Model):
    """``clean``: delete files matching ``glob`` older than ``older_than`` inside ``directory``."""

    directory: str
    glob: str = "*"
    older_than: Seconds = 86400.0
    recursive: bool = True


class Vacuum(_Model):
    """``vacuum``: ``VACUUM (ANALYZE)`` the tables (or the whole database) with asyncpg."""

    host: str = "127.0.0.1"
    port: Port = 5432
    user: str = "postgres"
    database: str = "postgres"
    password: Secret | None = None
    tables: tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")], ...] = ()
    statement_timeout: PositiveSeconds = 300.0
    tls: Literal["disable", "prefer", "require", "verify-full"] = "prefer"


class HttpAction(_Model):
    """``http``: call an endpoint of the service (e.g. a "reset conversation" endpoint)."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    method: Literal["GET", "POST", "PUT", "DELETE"] = "POST"
    timeout: PositiveSeconds = 10.0
    expect_status: tuple[Annotated[int, Field(ge=100, le=599)], ...] = (200, 202, 204)


_PLACEHOLDER = re.compile(r"^\{([a-zA-Z_][a-zA-Z0-9_]*)\}$")


class ExecAction(_Model):
    """``exec``: run argv (never a shell). An argv item that is exactly ``{name}`` is
    replaced by the alert's label ``name``, which must match ``labels[name]`` (a regex,
    matched in full); placeholders are whole argv items only."""

    argv: Annotated[tuple[str, ...], Field(min_length=1)]
    timeout: PositiveSeconds = 60.0
    labels: dict[str, Regex] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _placeholders_declared(self) -> ExecAction:
        for item in self.argv:
            m = _PLACEHOLDER.match(item)
            if m and m.group(1) not in self.labels:
                raise ValueError(f"argv uses {item} but labels does not declare {m.group(1)!r}")
            if not m and ("{" in item and "}" in item):
                raise ValueError(f"argv item {item!r}: placeholders must be whole argv items like {{name}}")
        return self


class SignalAction(_Model):
    """``signal``: send a signal to the service's processes (e.g. SIGHUP to reload)."""

    signal: SignalName


class Remediation(_Model):
    allow: tuple[Action, ...] = ()
    verify_timeout: PositiveSeconds = 30.0
    """Seconds a repaired service has to show its processes and pass its probes."""
    timeout: PositiveSeconds | None = None
    """Deadline of one repair, every step included; past it the repair is recorded as
    timed out and the service's next attempt is scheduled. Default: the receiver's
    ``repair_timeout``, or for a restart at least its grace period, SIGKILL wait,
    start timeout and verify timeout plus a minute."""
    rotate_logs: RotateLogs = RotateLogs()
    clean: tuple[CleanRule, ...] = ()
    vacuum: Vacuum | None = None
    http: HttpAction | None = None
    exec: ExecAction | None = None
    signal: SignalAction | None = None

    @model_validator(mode="after")
    def _allowed_actions_are_configured(self) -> Remediation:
        for action in ("vacuum", "http", "exec", "signal"):
            if action in self.allow and getattr(self, action) is None:
                raise ValueError(f"allow has {action!r} but there is no remediation.{action} block")
        if "clean" in self.allow and not self.clean:
            raise ValueError("allow has 'clean' but remediation.clean lists no directory")
        return self


class Limits(_Model):
    memory_bytes: int | None = Field(default=None, gt=0)
    open_fds: int | None = Field(default=None, gt=0)


class HealthWeights(_Model):
    """Weights of the health score's parts (DESIGN.md defaults)."""

    processes: float = Field(default=30, ge=0)
    probes: float = Field(default=25, ge=0)
    resources: float = Field(default=20, ge=0)
    integrity: float = Field(default=15, ge=0)
    heartbeats: float = Field(default=10, ge=0)


class ServiceConfig(_Model):
    match: Match
    processes: Processes = Processes()
    probes: tuple[Probe, ...] = ()
    heartbeats: tuple[Heartbeat, ...] = ()
    logs: tuple[LogWatch, ...] = ()
    files: tuple[FileCheck, ...] = ()
    directories: tuple[DirectoryCheck, ...] = ()
    data_paths: tuple[str, ...] = ()
    """Paths whose filesystem's free space is reported."""
    ports: tuple[Port, ...] = ()
    """TCP ports the service listens on; a port held by another process is a conflict."""
    start: Start | None = None
    stop: Stop = Stop()
    remediation: Remediation = Remediation()
    limits: Limits = Limits()
    health_weights: HealthWeights | None = None
    depends_on: tuple[Name, ...] = ()
    """Services this one needs (names of other services). While one of them is unhealthy,
    this service is not repaired: its problems wait (``dependency_unhealthy``) without
    spending its budget, and the dependency is repaired first. No cycles."""

    @field_validator("probes")
    @classmethod
    def _unique_probe_names(cls, probes: tuple[Any, ...]) -> tuple[Any, ...]:
        seen: set[str] = set()
        for probe in probes:
            if probe.name in seen:
                raise ValueError(f"probe name {probe.name!r} is used twice")
            seen.add(probe.name)
        return probes

    @model_validator(mode="after")
    def _unique_paths(self) -> ServiceConfig:
        lists: dict[str, list[str]] = {
            "files": [f.path for f in self.files], "directories": [d.path for d in self.directories],
            "logs": [w.path for w in self.logs], "data_paths": list(self.data_paths),
            "ports": [str(p) for p in self.ports]}
        for kind, values in lists.items():
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{kind} lists {', '.join(twice)} more than once")
        return self

    @model_validator(mode="after")
    def _restart_needs_start(self) -> ServiceConfig:
        allow = self.remediation.allow
        if "restart" in allow and self.start is None:
            raise ValueError("remediation.allow has 'restart' but the service has no 'start' command")
        needs = {"free_port": (self.ports and self.start, "ports and a start command"),
                 "ensure_paths": (self.directories, "directories"),
                 "restore_file": ([f for f in self.files if f.format or f.default], "files with a format or default"),
                 "rotate_logs": (self.logs or (self.start and self.start.log_file), "logs or start.log_file")}
        for action, (present, what) in needs.items():
            if action in allow and not present:
                raise ValueError(f"remediation.allow has {action!r} but the service has no {what}")
        return self


class ListenConfig(_Model):
    listen_address: str = "127.0.0.1"


class ExporterConfig(ListenConfig):
    port: Port = DEFAULT_EXPORTER_PORT
    max_scrape_timeout: PositiveSeconds = 10.0
    """Upper bound on one collection, also when Prometheus allows more."""
    state_file: str = "caretaker-exporter-state.json"
    """Heartbeats, kept across restarts (relative to the config file's directory)."""
    log_read_limit_bytes: int = Field(default=8 * 1024 * 1024, ge=4096)
    """At most this much of each log file is read per collection; the rest waits."""


class Attempts(_Model):
    max: int = Field(default=3, ge=1)
    window: PositiveSeconds = 900.0
    healthy_for: PositiveSeconds = 600.0
    """An exhausted service is repaired again once it has been healthy this long."""


class Retention(_Model):
    """How long the audit trail keeps its entries (and closed problems)."""

    max_age: PositiveSeconds = 30 * 86400.0
    """Entries older than this go (never those of open problems, nor repairs within the
    attempt window, which the budget counts)."""
    max_entries: int = Field(default=100_000, ge=1000)
    """At most this many entries; the oldest go first."""


class Confirm(_Model):
    """How the receiver confirms, before it acts, that a probe failure is still there."""

    probe_failures: int = Field(default=3, ge=1, le=20)
    """A failing probe must fail this many times in a row before a service whose
    processes run is stopped."""
    window: Seconds = 5.0
    """...spread over at least this many seconds, so that a stall (a long GC pause, an
    fsync, a slow command) is not taken for a freeze."""
    interval: PositiveSeconds = 0.25
    """Seconds between the probes when every process of the service is stopped (state
    T, e.g. SIGSTOP): such a process cannot answer until continued, so no window is
    waited (3 probes with a 1 s timeout take about 1.5 s)."""


class Backoff(_Model):
    """Repairs after the attempt budget is spent: not given up, but spaced out."""

    initial: PositiveSeconds = 300.0
    """Seconds from the end of the repair that spent the budget to the next try."""
    max: PositiveSeconds = 3600.0
    """The delay doubles after each further failed try, up to this."""

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.max < self.initial:
            raise ValueError(f"max ({self.max:g}s) is less than initial ({self.initial:g}s)")
        return self


class BasicAuth(_Model):
    username: str
    password: Secret


class TlsConfig(_Model):
    cert_file: str
    key_file: str


class Evidence(_Model):
    """What the receiver keeps before a destructive repair (restart, stop, free_port)."""

    log_lines: int = Field(default=50, ge=0, le=10000)
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=0)
    """Total size of the evidence directory; the oldest files go first."""
    py_spy: bool = True
    """Dump Python stacks with py-spy (when installed) of Python processes about to be stopped."""


class RedisState(_Model):
    """Redis shared by several receivers (HA): dedupe, per-service locks, budgets, cooldowns."""

    host: str = "127.0.0.1"
    port: Port = 6379
    db: int = Field(default=0, ge=0)
    password: Secret | None = None
    key_prefix: str = "caretaker:"
    dedupe_ttl: PositiveSeconds = 7 * 86400.0


_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|[^,"{}\s]+)\s*(?:,|$)')


@dataclass(frozen=True)
class Matcher:
    """One Alertmanager label matcher: ``name op value`` (regexes are fully anchored)."""

    name: str
    op: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        got = labels.get(self.name, "")
        if self.op in ("=", "!="):
            return (got == self.value) == (self.op == "=")
        return (re.fullmatch(self.value, got) is not None) == (self.op == "=~")


def parse_matchers(text: str) -> tuple[Matcher, ...]:
    """Alertmanager's matcher list syntax: ``alertname="X", service_name=~"a|b"``,
    optionally in braces (https://prometheus.io/docs/alerting/latest/configuration/#matcher).
    Raises ``ValueError`` naming the part that does not parse."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    out, pos = [], 0
    while pos < len(body):
        m = _MATCHER.match(body, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot parse matcher at {body[pos:pos + 30]!r} (expected name=\"value\", "
                             "name!=..., name=~..., name!~...)")
        name, op, raw = m.group(1), m.group(2), m.group(3)
        value = json.loads(raw) if raw.startswith('"') else raw
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"invalid regular expression in {name}{op}{raw}: {err}") from err
        out.append(Matcher(name, op, value))
        pos = m.end()
    if not out:
        raise ValueError("no matchers")
    return tuple(out)


class RepairRule(_Model):
    """Alerts matching ``match`` (Alertmanager matcher syntax) get ``steps``, run in
    order, stopping at the first failure. The service is the alert's ``service_name``,
    and it must allow every step."""

    match: str
    steps: Annotated[tuple[Action, ...], Field(min_length=1)]
    _matchers: tuple[Matcher, ...] = PrivateAttr(default=())

    @field_validator("match")
    @classmethod
    def _parses(cls, value: str) -> str:
        parse_matchers(value)
        return value

    def model_post_init(self, context: Any, /) -> None:
        self._matchers = parse_matchers(self.match)  # parsed once: rules are checked for every alert

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self._matchers)


class ReceiverConfig(ListenConfig):
    port: Port = DEFAULT_RECEIVER_PORT
    bearer_token: Secret | None = None
    basic_auth: BasicAuth | None = None
    tls: TlsConfig | None = None
    alertmanager_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    """Where to post CaretakerRepairsExhausted (Alertmanager's API v2); none: metric only."""
    evidence: Evidence = Evidence()
    backup_interval: PositiveSeconds = 60.0
    """How often valid declared files are backed up for restore_file."""
    shared_state: RedisState | None = None
    """Set when several receivers serve the same services (e.g. one per Alertmanager)."""
    rules: tuple[RepairRule, ...] = ()
    """Checked in order before the alert's ``remediation`` label; the first match wins."""
    silence_during_repair: bool = False
    """With ``alertmanager_url``: silence the service's alerts while it is restarted."""
    state_file: str = "caretaker-state.sqlite"
    """SQLite file (relative to the config file's directory) for dedupe, audit, budgets."""
    state_reserve_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    """Disk space held in ``<state_file>.reserve`` and given up when that disk is full,
    so the receiver can still record the alert that asks to clean it (0: none)."""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_connections: int = Field(default=256, ge=8, le=100_000)
    """Client connections at once; more are closed at once. Keep it well below the
    receiver's descriptor limit (LimitNOFILE), which its own work needs too."""
    header_timeout: PositiveSeconds = 10.0
    """A connection that has not sent a whole request head this long after it opened,
    or after its previous answer, is closed (slow or stalled clients, idle keep-alive)."""
    body_timeout: PositiveSeconds = 10.0
    """A request body not received within this is answered 408."""
    cooldown: Seconds = 60.0
    """Seconds after a repair of a service before another repair of it may start."""
    attempts: Attempts = Attempts()
    audit_retention: Retention = Retention()
    backoff: Backoff = Backoff()
    confirm: Confirm = Confirm()
    problem_ttl: PositiveSeconds = 13 * 3600.0
    """An open problem that no notification has refreshed for this long expires: a few
    of Alertmanager's ``repeat_interval`` for the receiver's route (its default is 4h;
    the shipped route resends every 10m)."""
    recheck_interval: PositiveSeconds = 1.0
    """Seconds between observations of a service whose problem waits (a dependency, a
    cleared condition); doubles while nothing changes, up to 30 s."""
    repair_timeout: PositiveSeconds = 300.0
    """Default deadline of one repair (see ``remediation.timeout``)."""
    track_interval: PositiveSeconds = 1.0
    """Seconds between the receiver's own scans of the services' processes and their
    children, kept so that leftovers of a dead incarnation can be stopped."""
    workers: int = Field(default=4, ge=1, le=64)
    """Services that may be looked at or repaired at the same time (a worker takes a
    slot before it looks, so that what it acts on is what it saw)."""

    @model_validator(mode="after")
    def _retention_covers_the_budget(self) -> ReceiverConfig:
        if self.audit_retention.max_age < self.attempts.window:
            raise ValueError(f"audit_retention.max_age ({self.audit_retention.max_age:g}s) is shorter than "
                             f"attempts.window ({self.attempts.window:g}s), which counts repairs in the audit trail")
        return self


class Config(_Model):
    exporter: ExporterConfig = ExporterConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    health_weights: HealthWeights = HealthWeights()
    services: dict[Name, ServiceConfig] = Field(min_length=1)
    base_dir: Path = Path(".")
    """Directory of the config file; relative paths in it are resolved against it."""

    @model_validator(mode="after")
    def _absolute_pidfiles(self) -> Config:
        # Process discovery gets services without the config's directory; a pidfile
        # path is made absolute here, once, so every reader finds the same file.
        for name, cfg in self.services.items():
            if cfg.match.pidfile is not None:
                match = cfg.match.model_copy(update={"pidfile": str(self.resolve(cfg.match.pidfile))})
                self.services[name] = cfg.model_copy(update={"match": match})
        return self

    @model_validator(mode="after")
    def _unique_heartbeats(self) -> Config:
        seen: dict[str, str] = {}
        for service, cfg in self.services.items():
            for hb in cfg.heartbeats:
                if hb.name in seen:
                    raise ValueError(f"heartbeat {hb.name!r} of {service} is also one of {seen[hb.name]}; "
                                     "heartbeat names must be unique")
                seen[hb.name] = service
        return self

    def heartbeat(self, name: str) -> tuple[str, Heartbeat] | None:
        """``(service, heartbeat)`` for a heartbeat name, or ``None``."""
        for service, cfg in self.services.items():
            for hb in cfg.heartbeats:
                if hb.name == name:
                    return service, hb
        return None

    def resolve(self, path: str) -> Path:
        """``path`` made absolute against the config file's directory."""
        return (self.base_dir / os.path.expanduser(path)).resolve()

    def weights_for(self, service: str) -> HealthWeights:
        return self.services[service].health_weights or self.health_weights


def read_secret(secret: Secret, base_dir: Path) -> str:
    """The secret's value; raises ``ConfigError`` when it cannot be read or is empty."""
    where = f"file {secret.file}" if secret.file else f"environment variable {secret.env}"
    if secret.file is not None:
        path = base_dir / os.path.expanduser(secret.file)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(str(path), [f"cannot read secret: {err.strerror}"]) from err
    else:
        value = os.environ.get(secret.env or "", "").strip()
    if not value:
        raise ConfigError("config", [f"secret from {where} is empty or missing"])
    return value


# --- YAML with line numbers -------------------------------------------------------


def _line_index(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = key_node.start_mark.line + 1
            _line_index(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), out)


def _format_loc(loc: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """Pydantic's loc as ``services.redis.probes[0].timeout``, and the YAML path.

    Discriminated unions put the tag (``http``) after the list index; it is not a
    key of the file, so it is dropped.
    """
    text = ""
    path: list[Any] = []
    previous_was_index = False
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            path.append(part)
            previous_was_index = True
            continue
        if previous_was_index and part in PROBE_TYPES:
            previous_was_index = False
            continue
        previous_was_index = False
        text += f".{part}" if text else str(part)
        path.append(part)
    return text or "(top level)", tuple(path)


def parse_config(data: Any, source: str = "config", lines: Mapping[tuple[Any, ...], int] | None = None,
                 base_dir: Path | None = None) -> Config:
    """Validate already-parsed YAML data. Raises ``ConfigError`` listing every problem."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with a 'services' key"])
    if "base_dir" in data:
        raise ConfigError(source, ["base_dir: not a configuration key"])
    try:
        config = Config.model_validate({**data, "base_dir": base_dir or Path.cwd()})
    except ValidationError as err:
        problems = []
        for e in err.errors():
            place, path = _format_loc(tuple(e["loc"]))
            line = lines.get(path)
            if line is None:  # a missing key: point at its parent
                line = lines.get(path[:-1])
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                message = "unknown key"
            elif e["type"] == "missing":
                message = "required key is missing"
            problems.append(f"{place}{f' (line {line})' if line else ''}: {message}")
        raise ConfigError(source, problems) from err
    problems = []
    for loc, message in dependency_problems(config):
        place, path = _format_loc(loc)
        line = lines.get(path)
        problems.append(f"{place}{f' (line {line})' if line else ''}: {message}")
    if problems:
        raise ConfigError(source, problems)
    return config


def dependency_problems(config: Config) -> list[tuple[tuple[Any, ...], str]]:
    """``depends_on`` cross-checks: every name is a service, none is the service itself,
    and there is no cycle (one depth-first search: linear in services and edges).
    Returns ``(location, message)`` for each problem."""
    out: list[tuple[tuple[Any, ...], str]] = []
    for name, cfg in config.services.items():
        for i, dep in enumerate(cfg.depends_on):
            if dep == name:
                out.append((("services", name, "depends_on", i), "a service cannot depend on itself"))
            elif dep not in config.services:
                out.append((("services", name, "depends_on", i), f"no service named {dep!r}"))
    state: dict[str, int] = {}  # absent: not seen; 1: on the current path; 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in config.services[node].depends_on:
            if dep not in config.services or dep == node:
                continue
            if state.get(dep) == 1:  # back to a service on the path: a cycle
                cycle = path[path.index(dep):]
                first = cycle[0]
                index = config.services[first].depends_on.index(cycle[1] if len(cycle) > 1 else dep)
                out.append((("services", first, "depends_on", index),
                            f"dependency cycle: {' -> '.join((*cycle, first))}"))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for name in config.services:
        if name not in state:
            visit(name)
    return out


def dependency_order(config: Config) -> list[str]:
    """Service names with every service after the services it depends on (stable)."""
    done: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in done or name in seen:
            return
        for dep in config.services[name].depends_on:
            if dep in config.services:
                visit(dep, (*seen, name))
        done.append(name)

    for name in config.services:
        visit(name, ())
    return done


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate ``path``. Raises ``ConfigError`` (never a bare exception)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(str(p), [f"cannot read: {err.strerror}"]) from err
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(p), [f"{where}not valid YAML: {getattr(err, 'problem', err)}"]) from err
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _line_index(node, (), lines)
    return parse_config(data, source=str(p), lines=lines, base_dir=p.resolve().parent)
