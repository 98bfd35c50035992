"""``services.<name>.remediation``: the repairs the receiver may run on a service, and
the settings of each (receiver/repairs.py, receiver/actions.py run them)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field

from .secrets import Secret
from .types import Action, FilePath, Model, Port, PositiveSeconds, Regex, Seconds, SignalName

__all__ = ["CleanRule", "ExecAction", "HttpAction", "Remediation", "RotateLogs", "SignalAction", "Vacuum"]

_PLACEHOLDER = re.compile(r"^\{([a-zA-Z_][a-zA-Z0-9_]*)\}$")
TableName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")]


class RotateLogs(Model):
    """``rotate_logs``: the service's log files (``logs`` and ``start.log_file``)."""

    keep: int = Field(default=5, ge=1, le=100)
    """Rotated files kept (``.1`` to ``.KEEP``); older ones are deleted."""
    compress: bool = True
    """gzip rotated files, all but the newest (``.1``)."""
    copytruncate: bool = False
    """Copy then truncate, for writers that cannot reopen their log."""
    reopen_signal: SignalName | None = Field(default=None, examples=["SIGHUP"])
    """Sent to the service after a rename so it reopens its log (e.g. SIGHUP, SIGUSR1)."""


class CleanRule(Model):
    """``clean``: delete files matching ``glob`` older than ``older_than`` inside ``directory``.
    Symlinks are never followed nor deleted."""

    directory: FilePath = Field(examples=["tmp/uploads"])
    """Only files inside it are deleted."""
    glob: str = "*"
    """Shell-style pattern on file names (``fnmatch``)."""
    older_than: Seconds = 86400.0
    """Only files not modified for this long."""
    recursive: bool = True
    """Also in subdirectories."""


class Vacuum(Model):
    """``vacuum``: ``VACUUM (ANALYZE)`` the tables (or the whole database) with asyncpg."""

    host: str = "127.0.0.1"
    """Host name, address, or a directory holding the server's Unix socket."""
    port: Port = 5432
    """TCP port of the server."""
    user: str = "postgres"
    """Role to connect as (it must own the tables, or be a superuser)."""
    database: str = "postgres"
    """Database to connect to."""
    password: Secret | None = Field(default=None, examples=[{"env": "PGPASSWORD"}])
    """Password, from a file or an environment variable."""
    tables: tuple[TableName, ...] = Field(default=(), examples=[["public.events"]])
    """Tables (``name`` or ``schema.name``); none: the whole database."""
    statement_timeout: PositiveSeconds = 300.0
    """PostgreSQL's ``statement_timeout`` for each VACUUM."""
    tls: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    """asyncpg's ``ssl`` mode (as libpq's ``sslmode``)."""


class HttpAction(Model):
    """``http``: call an endpoint of the service (e.g. a "reset conversation" endpoint)."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] = Field(examples=["http://127.0.0.1:8000/admin/reset"])
    """``http://`` or ``https://`` URL."""
    method: Literal["GET", "POST", "PUT", "DELETE"] = "POST"
    """HTTP method (no body is sent)."""
    timeout: PositiveSeconds = 10.0
    """How long the call may take."""
    expect_status: tuple[Annotated[int, Field(ge=100, le=599)], ...] = (200, 202, 204)
    """Status codes that count as success."""


class ExecAction(Model):
    """``exec``: run argv (never a shell). An argv item that is exactly ``{name}`` is
    replaced by the alert's label ``name``, which must match ``labels[name]`` (a regex,
    matched in full); placeholders are whole argv items only."""

    argv: Annotated[tuple[str, ...], Field(min_length=1)] = Field(
        examples=[["scripts/flush-queue.sh", "{queue}"]])
    """Program and arguments; it runs in the config file's directory with a minimal
    environment (PATH and LANG). A bare name is looked up on PATH."""
    timeout: PositiveSeconds = 60.0
    """How long it may run; then its whole process group is killed."""
    labels: dict[str, Regex] = Field(default_factory=dict, examples=[{"queue": "[a-z_]{1,40}"}])
    """Alert labels the argv may use as ``{name}``, each with the regex its value must match."""

    def cross_check(self) -> Iterator[str]:
        for item in self.argv:
            m = _PLACEHOLDER.match(item)
            if m and m.group(1) not in self.labels:
                yield f"argv uses {item} but labels does not declare {m.group(1)!r}"
            if not m and ("{" in item and "}" in item):
                yield f"argv item {item!r}: placeholders must be whole argv items like {{name}}"


class SignalAction(Model):
    """``signal``: send a signal to the service's processes (e.g. SIGHUP to reload)."""

    signal: SignalName = Field(examples=["SIGHUP"])
    """The signal to send."""


class Remediation(Model):
    """What the receiver may do to repair the service: the actions in ``allow``, with the
    settings of each. An alert asks for one with its ``remediation`` label; anything
    not allowed is recorded and skipped."""

    allow: tuple[Action, ...] = Field(default=(), examples=[["restart", "stop_duplicates"]])
    """Actions the receiver may run on this service; none: it only records."""
    verify_timeout: PositiveSeconds = 30.0
    """Seconds a repaired service has to show its processes and pass its probes."""
    timeout: PositiveSeconds | None = Field(default=None, examples=["5m"])
    """Deadline of one repair, every step included; past it the repair is recorded as
    timed out and the service's next attempt is scheduled. Default: the receiver's
    ``repair_timeout``, or for a restart at least its grace period, SIGKILL wait,
    start timeout and verify timeout plus a minute."""
    rotate_logs: RotateLogs = RotateLogs()
    """Settings of ``rotate_logs``."""
    clean: tuple[CleanRule, ...] = ()
    """Directories ``clean`` cleans."""
    vacuum: Vacuum | None = None
    """Settings of ``vacuum`` (required to allow it)."""
    http: HttpAction | None = None
    """Settings of ``http`` (required to allow it)."""
    exec: ExecAction | None = None
    """Settings of ``exec`` (required to allow it)."""
    signal: SignalAction | None = None
    """Settings of ``signal`` (required to allow it)."""

    def cross_check(self) -> Iterator[str]:
        for action in ("vacuum", "http", "exec", "signal"):
            if action in self.allow and getattr(self, action) is None:
                yield f"allow has {action!r} but there is no remediation.{action} block"
        if "clean" in self.allow and not self.clean:
            yield "allow has 'clean' but remediation.clean lists no directory"
