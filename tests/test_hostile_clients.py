"""Malformed and hostile requests: a 4xx with a reason, at most a WARNING line, never a
traceback nor a 500."""

from __future__ import annotations

import asyncio
import logging

import pytest

from receiver.app import QuietProtocolErrors, create_app

from .helpers import MakeConfig, idle_service, serving


async def raw_request(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(400), 5)
    writer.close()
    await writer.wait_closed()
    return data.split(b"\r\n")[0]


async def test_malformed_requests_are_4xx_with_one_warning_and_no_traceback(make_config: MakeConfig,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(service=idle_service(), token=True)
    quiet = QuietProtocolErrors(interval=60)
    server_log = logging.getLogger("aiohttp.server")
    server_log.addFilter(quiet)
    body = b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    try:
        async with serving(create_app(config)) as port:
            with caplog.at_level(logging.DEBUG):
                # Credentials that are not UTF-8, or not ASCII: wrong credentials, not a crash.
                for auth in (b"Bearer \xff\xfe", "Basic été".encode(), "Bearer tökén".encode()):
                    status = await raw_request(port, b"POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
                                               + b"\r\n" + body)
                    assert status == b"HTTP/1.1 401 Unauthorized", auth
                for bad in (b"POST /alerts HTTP/1.1\r\nHost: x\r\nNo colon here\r\n" + body,
                            b"POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                            b"GARBAGE\x00\x01 / HTTP/9.9\r\n\r\n",
                            b"POST /alerts HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n"):
                    status = await raw_request(port, bad)
                    assert status.split()[1].startswith(b"4"), (bad[:40], status)
    finally:
        server_log.removeFilter(quiet)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], [
        (r.levelname, r.getMessage()[:80]) for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    warnings = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # the rest counted, not logged
    assert quiet.suppressed == 3
