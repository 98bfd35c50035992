"""One service (``services.<name>``): how to find it, what it should look like, how to
start and stop it, and what the receiver may do to repair it (:mod:`.remediation`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from .claims import Claims
from .machine import service_problems
from .probes import Probe
from .remediation import Remediation
from .secrets import Secret
from .types import (
    Bytes,
    DocDefault,
    EnvName,
    FilePath,
    Model,
    Name,
    Port,
    PositiveSeconds,
    Problem,
    Regex,
    Seconds,
    SignalName,
    base_dir_from,
    problems_error,
    resolve_path,
)

__all__ = [
    "DirectoryCheck",
    "FileCheck",
    "HealthWeights",
    "Heartbeat",
    "Limits",
    "LogPattern",
    "LogWatch",
    "Match",
    "Processes",
    "ResourceLimits",
    "ServiceConfig",
    "Start",
    "Stop",
    "Supervisor",
]

Mode = Annotated[str, Field(pattern=r"^0?[0-7]{3,4}$")]


class Match(Model):
    """How to find a service's processes; every given regex must match (search)."""

    comm: Regex | None = Field(default=None, examples=["^redis-server$"])
    """Regex on the kernel's process name (``/proc/PID/comm``, at most 15 chars)."""
    exe: Regex | None = Field(default=None, examples=["^/usr/(local/)?bin/redis-server$"])
    """Regex on the executable path (``/proc/PID/exe``)."""
    cmdline: Regex | None = Field(default=None, examples=[":6379\\b"])
    """Regex on the command line, arguments joined by single spaces."""
    pidfile: FilePath | None = Field(default=None, examples=["/run/redis/redis-server.pid"])
    """File whose first line is the pid of the service's main process (relative to the
    config file's directory). Without regexes, it finds that one process (if it runs).
    With regexes, the regexes find the processes and the pidfile only names the one
    that ``stop_duplicates`` keeps first, so a second copy started by hand is still seen."""
    port: Port | None = Field(default=None, examples=[6379])
    """TCP port the service listens on (IPv4 or IPv6). Without regexes, the service's
    processes are those holding that listening socket (a server and the workers that
    share its socket), whoever they are: a squatter on the port counts as the service,
    so add a regex where that matters. With regexes, the holders are only kept first by
    ``stop_duplicates``."""

    @field_validator("pidfile")
    @classmethod
    def _absolute_pidfile(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Process discovery gets services without the config's directory: the path is
        # made absolute once, here, so that every reader finds the same file.
        return None if value is None else str(resolve_path(base_dir_from(info.context), value))

    def cross_check(self) -> Iterator[str]:
        if not self.by_regex and self.pidfile is None and self.port is None:
            yield "give at least one of comm, exe, cmdline, pidfile, port"

    @property
    def by_regex(self) -> bool:
        return self.comm is not None or self.exe is not None or self.cmdline is not None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Processes(Model):
    """How many processes the service should run (``min <= n <= max``). Give only ``min``
    and ``max`` is the same (``{min: 3}``: exactly three, so a fourth is a duplicate)."""

    min: int = Field(default=1, ge=0, json_schema_extra=DocDefault("1 (0 when max is 0)"))
    """Fewer is a problem (0: the service may be stopped)."""
    max: int = Field(default=1, ge=0, json_schema_extra=DocDefault("min, or 1 when min is 0"))
    """More is a problem (duplicates, which ``stop_duplicates`` stops)."""

    @model_validator(mode="before")
    @classmethod
    def _unwritten_bound_follows_the_other(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "max" not in data and _is_count(data.get("min")):
                return {**data, "max": max(data["min"], 1)}
            if "min" not in data and _is_count(data.get("max")):
                return {**data, "min": min(data["max"], 1)}
        return data

    def cross_check(self) -> Iterator[str]:
        if self.max < self.min:
            yield f"max ({self.max}) is less than min ({self.min})"


class Heartbeat(Model):
    """A watchdog the app feeds with ``POST /heartbeat/NAME`` on the exporter
    (``POST /heartbeat/NAME/fail`` reports a failure; see exporter/client.py)."""

    name: Name = Field(examples=["worker"])
    """Unique among all services' heartbeats: the ``NAME`` in the URL."""
    timeout: PositiveSeconds = Field(examples=["1m"])
    """Seconds without a heartbeat after which it counts as missing."""


class LogPattern(Model):
    """A pattern counted in a log (``caretaker_log_pattern_matches_total``)."""

    name: Name = Field(examples=["slow_query"])
    """The ``pattern`` label; a default pattern of the same name is replaced."""
    regex: Regex = Field(examples=["duration: \\d{4,} ms"])
    """Searched in every line."""
    severity: Literal["critical", "error", "warning", "info"] = "error"
    """The ``severity`` label."""


class LogWatch(Model):
    """A log file to follow; matches of each pattern are counted. Lines written before the
    exporter started are not read; rotation (rename or copytruncate) is followed."""

    path: FilePath = Field(examples=["logs/app.log"])
    """The log file (it may not exist yet)."""
    patterns: tuple[LogPattern, ...] = ()
    """Patterns of this log, beside the default ones."""
    default_patterns: bool | tuple[str, ...] = True
    """``true`` for the whole default pack (tracebacks, 5xx, out of memory, disk full...),
    ``false`` for none, or the names of the ones to use."""


class FileCheck(Model):
    """A file that must exist, maybe parse, be fresh, and have a mode/owner."""

    path: FilePath = Field(examples=["data/settings.json"])
    """The file."""
    format: Literal["json", "yaml"] | None = Field(default=None, examples=["json"])
    """It must parse as this; none: any content."""
    max_age: PositiveSeconds | None = Field(default=None, examples=["1h"])
    """It must have been modified within this; none: any age."""
    mode: Mode | None = Field(default=None, examples=["0640"])
    """Permission bits, octal (``"0640"``, quoted); none: any."""
    owner: str | None = Field(default=None, examples=["app"])
    """User name or uid that must own it; none: anyone."""
    group: str | None = Field(default=None, examples=["app"])
    """Group name or gid that must own it; none: any."""
    backups: int = Field(default=0, ge=0, le=100)
    """Valid copies the receiver keeps for ``restore_file`` (0: none)."""
    max_parse_bytes: Bytes = Field(default=16 * 1024 * 1024, ge=1, le=1024 * 1024 * 1024)
    """A larger file is not parsed: reported as not checked, never as corrupt (parsing
    takes memory of several times the file's size, in both programs)."""
    default: FilePath | None = Field(default=None, examples=["defaults/settings.json"])
    """A file to restore from when no valid backup exists."""


class DirectoryCheck(Model):
    """A directory that must exist (``ensure_paths`` creates it)."""

    path: FilePath = Field(examples=["data/uploads"])
    """The directory."""
    mode: Mode | None = Field(default=None, examples=["0750"])
    """Permission bits, octal (quoted); ``ensure_paths`` sets them; none: any."""


class Supervisor(Model):
    """A program run by supervisord; restarted with ``supervisorctl [-c CONFIG] restart PROGRAM``."""

    program: Name = Field(examples=["webapp"])
    """The program's name in supervisord's configuration."""
    config: FilePath | None = Field(default=None, examples=["/etc/supervisor/supervisord.conf"])
    """supervisord's configuration file (``-c``); none: supervisorctl's default."""


class ResourceLimits(Model):
    """Resource limits of an argv-started service (soft and hard), as systemd's
    ``LimitNOFILE=`` and friends; unset: inherited from the receiver."""

    nofile: int | None = Field(default=None, ge=0, examples=[10032])
    """Open file descriptors."""
    nproc: int | None = Field(default=None, ge=0, examples=[512])
    """Processes (threads count) of the service's user."""
    core: Bytes | None = Field(default=None, ge=0, examples=[0])
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


class Start(Model):
    """How to (re)start a service: argv (never a shell), a systemd unit, or a supervisord program.

    An argv-started service runs as systemd would run it: as ``user``/``group`` (with the
    user's supplementary groups, and HOME, USER, LOGNAME set), with ``umask`` and
    ``limits``, in a session of its own, and with a clean environment: PATH and LANG,
    the variables named in ``inherit_env`` (copied from the receiver's), and ``env``
    (values given, or read from a file or another variable). Nothing else of the
    receiver's environment reaches it: not its token, not its passwords."""

    argv: Annotated[tuple[str, ...], Field(min_length=1)] | None = Field(
        default=None, examples=[["redis-server", "--port", "6379"]])
    """Program and arguments, never through a shell. A bare name is looked up on the
    service's PATH; a relative path is relative to ``cwd``."""
    cwd: FilePath | None = Field(default=None, examples=["/var/lib/redis"])
    """Working directory of an argv-started service; default: the config file's directory."""
    env: dict[EnvName, str | Secret] = Field(default_factory=dict,
                                             examples=[{"REDIS_PASSWORD": {"file": "secrets/redis-password"}}])
    """Variables for the service: ``NAME: value``, or ``NAME: {file: path}`` / ``{env: VAR}``."""
    inherit_env: tuple[EnvName, ...] = Field(default=(), examples=[["TZ"]])
    """Names of the receiver's environment variables the service gets as they are."""
    user: Annotated[str | int, BeforeValidator(lambda v: _account_exists(v, "user"))] | None = Field(
        default=None, examples=["redis"])
    """Run as this user (name or uid). The receiver must run as root, or as that user."""
    group: Annotated[str | int, BeforeValidator(lambda v: _account_exists(v, "group"))] | None = Field(
        default=None, examples=["redis"])
    """Primary group (name or gid); default: the user's."""
    umask: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] | None = Field(default=None, examples=["027"])
    """e.g. ``"027"``; default ``"022"`` (systemd's), whatever the receiver's own."""
    limits: ResourceLimits = ResourceLimits()
    """Resource limits of the started process."""
    log_file: FilePath | None = Field(default=None, examples=["logs/redis.log"])
    """Standard output and error of an argv-started process go here (appended)."""
    systemd_unit: Annotated[str, Field(pattern=r"^[A-Za-z0-9@_.:-]+$")] | None = Field(
        default=None, examples=["redis-server.service"])
    """Restart with ``systemctl restart UNIT`` instead of argv."""
    supervisor: Supervisor | None = None
    """Restart a supervisord program instead of argv."""
    timeout: PositiveSeconds = 60.0
    """For systemctl/supervisorctl: how long the command may take."""

    def cross_check(self) -> Iterator[str]:
        given = [k for k in ("argv", "systemd_unit", "supervisor") if getattr(self, k) is not None]
        if len(given) != 1:
            yield "give exactly one of argv, systemd_unit, supervisor"
        if self.argv is None and (self.user is not None or self.group is not None or self.umask is not None
                                  or self.limits != ResourceLimits() or self.env or self.inherit_env):
            yield ("user, group, umask, limits, env and inherit_env are for argv; a systemd unit or "
                   "supervisord program sets its own")


class Stop(Model):
    """How the receiver stops the service's processes (a restart, ``stop_duplicates``)."""

    signal: SignalName = "SIGTERM"
    """Sent first, to each process."""
    grace_period: Seconds = 10.0
    """Seconds to wait after ``signal`` before SIGKILL."""
    leftovers: bool = True
    """Before a start, stop what is left of the previous incarnation (its children and
    session members that outlived it), as systemd's control-group kill does. ``false``
    for a service whose children must outlive it (sshd's sessions, tmux), as
    ``KillMode=process``."""


class Limits(Model):
    """Limits that are part of the health score (``resources``) and of alerts."""

    memory_bytes: Bytes | None = Field(default=None, gt=0, examples=[2_000_000_000])
    """Resident memory summed over the service's processes."""
    open_fds: int | None = Field(default=None, gt=0, examples=[1000])
    """Open file descriptors of any one of its processes."""


class HealthWeights(Model):
    """Weights of the health score's parts (the defaults weigh highest what most often
    makes a service unusable); a part that does not apply to a service is left out, so
    weights need not sum to anything."""

    processes: float = Field(default=30, ge=0)
    """``min <= n <= max`` processes."""
    probes: float = Field(default=25, ge=0)
    """The share of probes that pass."""
    resources: float = Field(default=20, ge=0)
    """The share of ``limits`` respected."""
    integrity: float = Field(default=15, ge=0)
    """Files, directories and ports as declared."""
    heartbeats: float = Field(default=10, ge=0)
    """Heartbeats fed in time."""


class ServiceConfig(Model):
    """A service: how to find it (``match``), what it should look like, how to start and
    stop it, and what the receiver may do to it (``remediation``)."""

    match: Match
    """How to find its processes."""
    processes: Processes = Processes()
    """How many processes it should run."""
    probes: tuple[Probe, ...] = ()
    """Checks that it answers."""
    heartbeats: tuple[Heartbeat, ...] = ()
    """Watchdogs the app feeds."""
    logs: tuple[LogWatch, ...] = ()
    """Log files whose error patterns are counted."""
    files: tuple[FileCheck, ...] = ()
    """Files that must exist (and parse, be fresh, have a mode/owner)."""
    directories: tuple[DirectoryCheck, ...] = ()
    """Directories that must exist."""
    data_paths: tuple[FilePath, ...] = Field(default=(), examples=[["/var/lib/redis"]])
    """Paths whose filesystem's free space is reported."""
    ports: tuple[Port, ...] = Field(default=(), examples=[[6379]])
    """TCP ports the service listens on; a port held by another process is a conflict."""
    start: Start | None = None
    """How to start it; none: the receiver cannot start it (no ``restart``)."""
    stop: Stop = Stop()
    """How to stop it."""
    remediation: Remediation = Remediation()
    """What the receiver may do to repair it."""
    limits: Limits = Limits()
    """Resource limits of the health score."""
    health_weights: HealthWeights | None = None
    """This service's weights; default: the top-level ``health_weights``."""
    claims: Claims | None = None
    """Work items its workers claim in Redis: orphaned claims (their owner died) are
    counted (``caretaker_claims``) and ``release_claims`` gives them back."""
    depends_on: tuple[Name, ...] = Field(default=(), examples=[["redis"]])
    """Services this one needs (names of other services). While one of them is unhealthy,
    this service is not repaired: its problems wait (``dependency_unhealthy``) without
    spending its budget, and the dependency is repaired first. No cycles."""

    @field_validator("probes")
    @classmethod
    def _unique_probe_names(cls, probes: tuple[Any, ...]) -> tuple[Any, ...]:
        names = [probe.name for probe in probes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise problems_error("probes", [f"probe name {n!r} is used twice" for n in twice], probes)
        return probes

    def machine_check(self, base_dir: Path) -> Iterable[Problem]:
        return service_problems(self, base_dir)

    def cross_check(self) -> Iterator[str]:
        lists: dict[str, list[str]] = {
            "files": [f.path for f in self.files], "directories": [d.path for d in self.directories],
            "logs": [w.path for w in self.logs], "data_paths": list(self.data_paths),
            "ports": [str(p) for p in self.ports]}
        for kind, values in lists.items():
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                yield f"{kind} lists {', '.join(twice)} more than once"
        allow = self.remediation.allow
        if "restart" in allow and self.start is None:
            yield "remediation.allow has 'restart' but the service has no 'start' command"
        needs = {"free_port": (self.ports and self.start, "ports and a start command"),
                 "ensure_paths": (self.directories, "directories"),
                 "restore_file": ([f for f in self.files if f.format or f.default], "files with a format or default"),
                 "rotate_logs": (self.logs or (self.start and self.start.log_file), "logs or start.log_file"),
                 "release_claims": (self.claims, "claims block")}
        for action, (present, what) in needs.items():
            if action in allow and not present:
                yield f"remediation.allow has {action!r} but the service has no {what}"
