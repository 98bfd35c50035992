"""Probes: how the exporter (and the receiver, before and after it acts) asks a service
whether it answers. One model per ``type``; ``Probe`` is their union, told apart by it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .secrets import Secret
from .types import FilePath, Model, Name, Port, PositiveSeconds, Regex

__all__ = ["ExecProbe", "HttpProbe", "PostgresProbe", "Probe", "RedisConnection", "RedisProbe", "TcpProbe"]

HttpUrl = Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
StatusCode = Annotated[int, Field(ge=100, le=599)]
PgTls = Literal["disable", "prefer", "require", "verify-full"]


class _ProbeBase(Model):
    name: Name = Field(examples=["health"])
    """Unique among the service's probes; the ``probe`` label of its series."""
    timeout: PositiveSeconds = 2.0
    """How long the probe may take (a scrape's own deadline may leave it less)."""


class HttpProbe(_ProbeBase):
    """Request a URL; success when the status is expected and the body matches.

    For ``https`` URLs the server certificate's expiry is reported too. Redirects are
    not followed."""

    type: Literal["http"]
    """The kind of probe."""
    url: HttpUrl = Field(examples=["http://127.0.0.1:8000/health"])
    """``http://`` or ``https://`` URL."""
    method: Literal["GET", "HEAD", "POST"] = "GET"
    """HTTP method (a POST sends no body)."""
    expect_status: tuple[StatusCode, ...] = (200,)
    """Status codes that count as success."""
    body_regex: Regex | None = Field(default=None, examples=['"status": ?"ok"'])
    """Searched in the first MiB of the body (decoded as UTF-8)."""
    ca_file: FilePath | None = Field(default=None, examples=["certs/ca.pem"])
    """CA certificates (PEM) that verify an ``https`` server; default: the system's."""
    insecure_skip_verify: bool = False
    """Do not verify the server's certificate (its expiry is still reported)."""


class TcpProbe(_ProbeBase):
    """Open a TCP connection; optionally send a line and expect a reply (regex)."""

    type: Literal["tcp"]
    """The kind of probe."""
    host: str = "127.0.0.1"
    """Host name or address to connect to."""
    port: Port = Field(examples=[6379])
    """TCP port to connect to."""
    send: str | None = Field(default=None, examples=["PING\r\n"])
    """Text sent once connected (UTF-8), as given: add the line end the service needs."""
    expect: Regex | None = Field(default=None, examples=["^\\+PONG"])
    """Searched in the reply (its first 4 KiB, read until it matches or the peer closes)."""


class RedisConnection(Model):
    """Where a Redis server is and how to log in: the keys a redis probe and ``claims``
    share."""

    host: str = "127.0.0.1"
    """Host name or address of the server."""
    port: Port = 6379
    """TCP port of the server."""
    username: str | None = Field(default=None, examples=["caretaker"])
    """ACL user (Redis 6+); default: the ``default`` user."""
    password: Secret | None = Field(default=None, examples=[{"file": "secrets/redis-password"}])
    """Password (``AUTH``), from a file or an environment variable."""
    tls: bool = False
    """Connect with TLS."""
    ca_file: FilePath | None = Field(default=None, examples=["certs/ca.pem"])
    """CA certificates (PEM) that verify the server with ``tls``; default: the system's."""


class RedisProbe(RedisConnection, _ProbeBase):
    """``PING`` a Redis server (redis-py), optionally with a password and TLS."""

    type: Literal["redis"]
    """The kind of probe."""


class PostgresProbe(_ProbeBase):
    """Connect and run ``SELECT 1`` (asyncpg, so SCRAM authentication works)."""

    type: Literal["postgres"]
    """The kind of probe."""
    host: str = "127.0.0.1"
    """Host name, address, or a directory holding the server's Unix socket."""
    port: Port = 5432
    """TCP port of the server (or of its socket file's name)."""
    user: str = "postgres"
    """Role to connect as."""
    database: str = "postgres"
    """Database to connect to."""
    password: Secret | None = Field(default=None, examples=[{"env": "PGPASSWORD"}])
    """Password, from a file or an environment variable; none: trust or peer authentication."""
    tls: PgTls = "prefer"
    """asyncpg's ``ssl`` mode (as libpq's ``sslmode``)."""


class ExecProbe(_ProbeBase):
    """Run argv (never a shell); success when it exits with an expected status in time.
    It runs with a minimal environment (PATH and LANG), in its own session, killed (its
    whole group) at the timeout."""

    type: Literal["exec"]
    """The kind of probe."""
    argv: Annotated[tuple[str, ...], Field(min_length=1, examples=[["pg_isready", "-q"]])]
    """Program and arguments. A bare name is looked up on PATH; a relative path is
    relative to ``cwd``."""
    expect_exit: tuple[int, ...] = (0,)
    """Exit statuses that count as success."""
    cwd: FilePath | None = Field(default=None, examples=["/srv/app"])
    """Working directory; default: the config file's directory."""

Probe = Annotated[HttpProbe | TcpProbe | RedisProbe | PostgresProbe | ExecProbe, Field(discriminator="type")]
"""A probe of any ``type`` (``http``, ``tcp``, ``redis``, ``postgres``, ``exec``)."""
