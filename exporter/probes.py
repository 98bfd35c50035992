"""Active probes of a service, each awaited with its own timeout.

- ``http``: status in ``expect_status``, optional ``body_regex`` on the first MiB;
  for https, the server certificate's ``notAfter`` as a Unix time.
- ``tcp``: connect; optionally send a string and expect a reply matching a regex.
- ``redis``: ``PING`` with redis-py's asyncio client (password, TLS).
- ``postgres``: connect and ``SELECT 1`` with asyncpg (SCRAM authentication works).
- ``exec``: run argv (never a shell) in its own process group; the exit status must
  be expected; on timeout the whole group is killed.

A probe never raises: every outcome is a :class:`ProbeResult` whose ``reason`` is
one of :data:`REASONS` (``""`` on success), so it can be a label without unbounded
cardinality.

redis-py and asyncpg are imported on the first probe of their type: an exporter that
watches no Redis and no PostgreSQL never loads them (about 7 MiB of RSS together).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yarl

from .config import ExecProbe, HttpProbe, PostgresProbe, Probe, RedisProbe, Secret, TcpProbe, read_secret
from .environment import minimal_environment

__all__ = ["REASONS", "ProbeContext", "ProbeResult", "run_probe", "run_probes"]

log = logging.getLogger(__name__)

REASONS = ("timeout", "refused", "tls", "status", "body", "auth", "error")
"""Why a probe failed; a fixed set (a metric label)."""
BODY_LIMIT = 1024 * 1024
TCP_READ_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class ProbeResult:
    success: bool
    duration_seconds: float
    reason: str = ""
    """Empty on success, else one of :data:`REASONS`."""
    detail: str = ""
    """Human-readable, for logs and the audit trail; never used as a label."""
    cert_not_after: float | None = None
    """For https probes: the server certificate's notAfter, Unix seconds (a timestamp)."""


@dataclass(frozen=True)
class ProbeContext:
    """What probes share: an HTTP session, the config directory (for secrets, files),
    and certificate expiries seen recently (``{url: (expiry, checked_at)}``)."""

    session: aiohttp.ClientSession
    base_dir: Path = Path(".")
    cert_cache: dict[str, tuple[float | None, float]] = field(default_factory=dict)

    def path(self, p: str) -> str:
        return str(self.base_dir / os.path.expanduser(p))

    def secret(self, s: Secret | None) -> str | None:
        return read_secret(s, self.base_dir) if s is not None else None


class _Failed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _ssl_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


CERT_RECHECK_SECONDS = 300.0


async def _cert_expiry(url: str, context: ssl.SSLContext, ctx: ProbeContext) -> float | None:
    """notAfter of the certificate the server presents, from a TLS handshake of our own.

    aiohttp has no supported way to read the peer certificate of a response
    (aio-libs/aiohttp#2816), so asyncio's documented ``get_extra_info("peercert")``
    is used; the answer is kept for :data:`CERT_RECHECK_SECONDS`.
    """
    cached = ctx.cert_cache.get(url)
    if cached is not None and time.monotonic() - cached[1] < CERT_RECHECK_SECONDS:
        return cached[0]
    parsed = yarl.URL(url)
    _, writer = await asyncio.open_connection(parsed.host, parsed.port, ssl=context, server_hostname=parsed.host)
    try:
        cert = writer.get_extra_info("peercert") or {}
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    expiry = float(ssl.cert_time_to_seconds(str(cert["notAfter"]))) if "notAfter" in cert else None
    ctx.cert_cache[url] = (expiry, time.monotonic())
    return expiry


async def _http(probe: HttpProbe, ctx: ProbeContext) -> tuple[str, float | None]:
    tls: ssl.SSLContext | bool = True
    if probe.url.startswith("https:"):
        tls = _ssl_context(ctx.path(probe.ca_file) if probe.ca_file else None, probe.insecure_skip_verify)
    expiry = None
    async with ctx.session.request(probe.method, probe.url, allow_redirects=False, ssl=tls) as resp:
        body = await resp.content.read(BODY_LIMIT)
        if resp.status not in probe.expect_status:
            raise _Failed("status", f"HTTP {resp.status}, expected {list(probe.expect_status)}")
        if probe.body_regex is not None and not re.search(probe.body_regex, body.decode("utf-8", "replace")):
            raise _Failed("body", f"body does not match {probe.body_regex!r}")
    if isinstance(tls, ssl.SSLContext):
        expiry = await _cert_expiry(probe.url, tls, ctx)
    return f"HTTP {resp.status}", expiry


async def _tcp(probe: TcpProbe) -> str:
    reader, writer = await asyncio.open_connection(probe.host, probe.port)
    try:
        if probe.send is not None:
            writer.write(probe.send.encode())
            await writer.drain()
        if probe.expect is not None:
            pattern = re.compile(probe.expect)
            received = b""
            while len(received) < TCP_READ_LIMIT:
                chunk = await reader.read(TCP_READ_LIMIT - len(received))
                if not chunk:
                    break
                received += chunk
                if pattern.search(received.decode("latin-1")):
                    return "reply matched"
            raise _Failed("body", f"reply {received[:80]!r} does not match {probe.expect!r}")
        return "connected"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _redis(probe: RedisProbe, ctx: ProbeContext, limit: float) -> str:
    import redis.asyncio as aioredis  # noqa: PLC0415 - loaded only when a Redis is probed
    import redis.exceptions as redis_errors  # noqa: PLC0415
    from redis.asyncio.retry import Retry  # noqa: PLC0415
    from redis.backoff import NoBackoff  # noqa: PLC0415

    client = aioredis.Redis(host=probe.host, port=probe.port, username=probe.username,
                            password=ctx.secret(probe.password), ssl=probe.tls,
                            ssl_ca_certs=ctx.path(probe.ca_file) if probe.ca_file else None,
                            socket_connect_timeout=limit, socket_timeout=limit,
                            retry=Retry(NoBackoff(), 0))  # a probe answers once; no retries
    try:
        await client.ping()
        return "PONG"
    except (redis_errors.AuthenticationError, redis_errors.AuthenticationWrongNumberOfArgsError) as err:
        raise _Failed("auth", str(err)) from err
    except redis_errors.ResponseError as err:
        if "NOAUTH" in str(err) or "WRONGPASS" in str(err):
            raise _Failed("auth", str(err)) from err
        raise _Failed("error", str(err)) from err
    except redis_errors.TimeoutError as err:
        raise _Failed("timeout", str(err) or "timed out") from err
    except redis_errors.ConnectionError as err:
        text = str(err)
        if "SSL" in text or "certificate" in text:
            raise _Failed("tls", text) from err
        refused = isinstance(err.__context__, ConnectionRefusedError) or "refused" in text.lower()
        raise _Failed("refused" if refused else "error", text) from err
    finally:
        await client.aclose()


async def _postgres(probe: PostgresProbe, ctx: ProbeContext, limit: float) -> str:
    import asyncpg  # noqa: PLC0415 - loaded only when a PostgreSQL is probed

    try:
        conn = await asyncpg.connect(host=probe.host, port=probe.port, user=probe.user, database=probe.database,
                                     password=ctx.secret(probe.password), timeout=limit, ssl=probe.tls)
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as err:
        raise _Failed("auth", str(err)) from err
    except asyncpg.PostgresError as err:
        raise _Failed("error", f"{type(err).__name__}: {err}") from err
    try:
        value = await conn.fetchval("SELECT 1")
        if value != 1:
            raise _Failed("body", f"SELECT 1 returned {value!r}")
        return "SELECT 1"
    finally:
        await conn.close()


async def _exec(probe: ExecProbe, ctx: ProbeContext) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *probe.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, env=minimal_environment(),
            cwd=ctx.path(probe.cwd) if probe.cwd else ctx.base_dir)
    except OSError as err:
        raise _Failed("error", f"cannot run {probe.argv[0]!r}: {err.strerror}") from err
    try:
        code = await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        raise
    if code not in probe.expect_exit:
        raise _Failed("status", f"exit status {code}, expected {list(probe.expect_exit)}")
    return f"exit status {code}"


async def run_probe(probe: Probe, ctx: ProbeContext, timeout: float | None = None) -> ProbeResult:
    """Run one probe within ``min(probe.timeout, timeout)`` seconds. Never raises."""
    limit = probe.timeout if timeout is None else max(0.0, min(probe.timeout, timeout))
    started = time.perf_counter()
    reason, expiry = "", None
    try:
        async with asyncio.timeout(limit):
            if isinstance(probe, HttpProbe):
                detail, expiry = await _http(probe, ctx)
            elif isinstance(probe, TcpProbe):
                detail = await _tcp(probe)
            elif isinstance(probe, RedisProbe):
                detail = await _redis(probe, ctx, limit)
            elif isinstance(probe, PostgresProbe):
                detail = await _postgres(probe, ctx, limit)
            else:
                detail = await _exec(probe, ctx)
    except _Failed as err:
        reason, detail = err.reason, err.detail
    except TimeoutError:
        reason, detail = "timeout", f"no answer within {limit:.3g}s"
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError) as err:
        reason, detail = "tls", str(err)
    except (ConnectionRefusedError, aiohttp.ClientConnectorError) as err:
        reason, detail = "refused", str(err) or type(err).__name__
    except Exception as err:  # a probe must never take the scrape down; the reason says so
        reason, detail = "error", f"{type(err).__name__}: {err}"
    duration = time.perf_counter() - started
    return ProbeResult(not reason, duration, reason, detail, expiry)


async def run_probes(probes: Sequence[Probe], ctx: ProbeContext,
                     timeout: float | None = None) -> dict[str, ProbeResult]:
    """Run probes concurrently; results by probe name."""
    results = await asyncio.gather(*(run_probe(p, ctx, timeout) for p in probes))
    return {p.name: r for p, r in zip(probes, results, strict=True)}
