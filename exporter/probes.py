"""Active probes of a service: HTTP and TCP, each awaited with its own timeout.

A probe never raises: every outcome is a :class:`ProbeResult` whose ``reason`` is one
of a small fixed set (``""`` on success, ``timeout``, ``refused``, ``status``,
``error``), so it can be a label without unbounded cardinality.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from .config import HttpProbe, Probe, TcpProbe

__all__ = ["ProbeResult", "run_probe", "run_probes"]

log = logging.getLogger(__name__)

REASONS = ("timeout", "refused", "status", "error")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    success: bool
    duration_seconds: float
    reason: str = ""
    """Empty on success, else one of :data:`REASONS`."""
    detail: str = ""
    """Human-readable, for logs and the audit trail; never used as a label."""


async def _http(probe: HttpProbe, session: aiohttp.ClientSession) -> tuple[str, str]:
    async with session.request(probe.method, probe.url, allow_redirects=False) as resp:
        await resp.read()
        if resp.status not in probe.expect_status:
            return "status", f"HTTP {resp.status}, expected {list(probe.expect_status)}"
        return "", f"HTTP {resp.status}"


async def _tcp(probe: TcpProbe) -> tuple[str, str]:
    _, writer = await asyncio.open_connection(probe.host, probe.port)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return "", "connected"


async def run_probe(probe: Probe, session: aiohttp.ClientSession, timeout: float | None = None) -> ProbeResult:
    """Run one probe within ``min(probe.timeout, timeout)`` seconds."""
    limit = probe.timeout if timeout is None else max(0.0, min(probe.timeout, timeout))
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            if isinstance(probe, HttpProbe):
                reason, detail = await _http(probe, session)
            else:
                reason, detail = await _tcp(probe)
    except TimeoutError:
        reason, detail = "timeout", f"no answer within {limit:.3g}s"
    except (ConnectionRefusedError, aiohttp.ClientConnectorError) as err:
        reason, detail = "refused", str(err) or type(err).__name__
    except (OSError, aiohttp.ClientError, ValueError) as err:
        reason, detail = "error", f"{type(err).__name__}: {err}"
    duration = time.perf_counter() - started
    return ProbeResult(success=not reason, duration_seconds=duration, reason=reason, detail=detail)


async def run_probes(probes: Sequence[Probe], session: aiohttp.ClientSession,
                     timeout: float | None = None) -> dict[str, ProbeResult]:
    """Run probes concurrently; results by probe name."""
    results = await asyncio.gather(*(run_probe(p, session, timeout) for p in probes))
    return {p.name: r for p, r in zip(probes, results, strict=True)}
