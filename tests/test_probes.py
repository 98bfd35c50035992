"""Probes against the real thing: Redis, PostgreSQL, HTTP(S), TCP, exec."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.probes import ProbeContext, ProbeResult, run_probe

from .helpers import (
    Postgres,
    build_config,
    free_port,
    idle_service,
    make_cert,
    port_open,
    require_binary,
    serving,
    wait_until,
)


def probe(spec: dict[str, Any], tmp_path: Path) -> Any:
    return build_config(tmp_path, service=idle_service(probes=[{"name": "p", **spec}])).services["svc"].probes[0]


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[ProbeContext]:
    async with aiohttp.ClientSession() as session:
        yield ProbeContext(session, tmp_path)


async def check(spec: dict[str, Any], ctx: ProbeContext) -> ProbeResult:
    return await run_probe(probe(spec, ctx.base_dir), ctx)


# --- Redis ----------------------------------------------------------------------------

async def test_redis_ping_with_password(children: Any, ctx: ProbeContext, tmp_path: Path) -> None:
    binary = require_binary("redis-server")
    port = free_port()
    children.start([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--requirepass", "hunter2",
                    "--dir", str(tmp_path)])
    await wait_until(lambda: port_open(port), 10, what="redis")
    (tmp_path / "pw").write_text("hunter2\n")
    (tmp_path / "bad").write_text("wrong\n")
    ok = await check({"type": "redis", "port": port, "password": {"file": "pw"}}, ctx)
    assert (ok.success, ok.detail) == (True, "PONG")
    wrong = await check({"type": "redis", "port": port, "password": {"file": "bad"}}, ctx)
    assert (wrong.success, wrong.reason) == (False, "auth")
    none = await check({"type": "redis", "port": port}, ctx)
    assert (none.success, none.reason) == (False, "auth")


async def test_redis_over_tls(children: Any, ctx: ProbeContext, tmp_path: Path) -> None:
    binary = require_binary("redis-server")
    cert, key = await asyncio.to_thread(make_cert, tmp_path)
    port = free_port()
    children.start([binary, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port), "--tls-cert-file",
                    str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients",
                    "no", "--save", "", "--dir", str(tmp_path)])
    await wait_until(lambda: port_open(port), 10, what="redis with TLS")
    ok = await check({"type": "redis", "port": port, "tls": True, "ca_file": str(cert)}, ctx)
    assert (ok.success, ok.detail) == (True, "PONG")
    untrusted = await check({"type": "redis", "port": port, "tls": True}, ctx)
    assert (untrusted.success, untrusted.reason) == (False, "tls"), untrusted.detail
    plain = await check({"type": "redis", "port": port, "timeout": 1}, ctx)
    assert not plain.success


async def test_redis_down_is_refused(ctx: ProbeContext) -> None:
    result = await check({"type": "redis", "port": free_port()}, ctx)
    assert (result.success, result.reason) == (False, "refused")


async def test_tcp_send_expect_against_redis(redis_port: int, ctx: ProbeContext) -> None:
    port = redis_port
    ok = await check({"type": "tcp", "port": port, "send": "PING\r\n", "expect": "^\\+PONG"}, ctx)
    assert ok.success, ok.detail
    bad = await check({"type": "tcp", "port": port, "send": "PING\r\n", "expect": "^HELLO", "timeout": "500ms"}, ctx)
    assert (bad.success, bad.reason) == (False, "timeout")


# --- PostgreSQL -----------------------------------------------------------------------

async def test_postgres_select_1_with_scram(postgres_server: Postgres, ctx: ProbeContext, tmp_path: Path) -> None:
    (tmp_path / "pgpw").write_text(postgres_server.password)
    (tmp_path / "badpw").write_text("nope")
    spec = {"type": "postgres", "port": postgres_server.port, "user": "postgres", "tls": "disable", "timeout": "5s"}
    ok = await check({**spec, "password": {"file": "pgpw"}}, ctx)
    assert (ok.success, ok.detail) == (True, "SELECT 1"), ok.detail
    wrong = await check({**spec, "password": {"file": "badpw"}}, ctx)
    assert (wrong.success, wrong.reason) == (False, "auth"), wrong.detail
    down = await check({**spec, "port": free_port(), "password": {"file": "pgpw"}}, ctx)
    assert (down.success, down.reason) == (False, "refused"), down.detail


# --- exec -------------------------------------------------------------------------------

async def test_exec_probe_exit_status_and_timeout(ctx: ProbeContext) -> None:
    assert (await check({"type": "exec", "argv": ["true"]}, ctx)).success
    failed = await check({"type": "exec", "argv": ["false"]}, ctx)
    assert (failed.reason, failed.detail) == ("status", "exit status 1, expected [0]")
    assert (await check({"type": "exec", "argv": ["false"], "expect_exit": [1]}, ctx)).success
    missing = await check({"type": "exec", "argv": ["/nonexistent/prog"]}, ctx)
    assert missing.reason == "error"
    started = time.monotonic()
    slow = await check({"type": "exec", "argv": [sys.executable, "-c", "import time; time.sleep(30)"],
                        "timeout": "500ms"}, ctx)
    assert slow.reason == "timeout"
    assert time.monotonic() - started < 5


async def test_exec_probe_never_uses_a_shell(ctx: ProbeContext, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    result = await check({"type": "exec", "argv": ["echo", f"; touch {canary}"]}, ctx)
    assert result.success and not canary.exists()


# --- HTTP(S) ----------------------------------------------------------------------------

@pytest.fixture
async def https_server(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    cert, key = await asyncio.to_thread(make_cert, tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text='{"status": "degraded"}' if request.path == "/degraded" else '{"status": "ok"}')

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    async with serving(app, ssl_context=context) as port:
        yield port, cert


async def test_https_probe_reports_certificate_expiry(https_server: tuple[int, Path], ctx: ProbeContext) -> None:
    port, cert = https_server
    ok = await check({"type": "http", "url": f"https://127.0.0.1:{port}/health", "ca_file": str(cert)}, ctx)
    assert ok.success, ok.detail
    decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    assert ok.cert_not_after == ssl.cert_time_to_seconds(decoded["notAfter"])
    assert 29 * 86400 < ok.cert_not_after - time.time() < 31 * 86400
    untrusted = await check({"type": "http", "url": f"https://127.0.0.1:{port}/health"}, ctx)
    assert (untrusted.success, untrusted.reason) == (False, "tls")


async def test_http_body_regex(https_server: tuple[int, Path], ctx: ProbeContext) -> None:
    port, cert = https_server
    base = {"type": "http", "ca_file": str(cert), "body_regex": '"status": "ok"'}
    assert (await check({**base, "url": f"https://127.0.0.1:{port}/health"}, ctx)).success
    degraded = await check({**base, "url": f"https://127.0.0.1:{port}/degraded"}, ctx)
    assert (degraded.success, degraded.reason) == (False, "body")
