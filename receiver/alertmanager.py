"""A small client for Alertmanager's API v2: post alerts the receiver raises itself.

Format: ``POST /api/v2/alerts`` with a JSON list of ``{labels, annotations, startsAt,
endsAt}`` (prometheus/alertmanager ``api/v2/openapi.yaml``). An alert stays firing
while it is re-posted before its ``endsAt``; posting it with ``endsAt`` now resolves it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import aiohttp

from exporter.config import HOST_LABEL

__all__ = ["expire_silence", "host_matcher", "post_alert", "silence"]

log = logging.getLogger(__name__)


async def post_alert(session: aiohttp.ClientSession, base_url: str, labels: dict[str, str],
                     annotations: dict[str, str], starts_at: datetime, firing_for: timedelta | None) -> bool:
    """Post one alert; ``firing_for=None`` resolves it now. True when Alertmanager took it; never raises."""
    now = datetime.now(UTC)
    ends_at = now + firing_for if firing_for is not None else now
    body = [{"labels": labels, "annotations": annotations, "startsAt": starts_at.isoformat(),
             "endsAt": ends_at.isoformat()}]
    try:
        async with session.post(base_url.rstrip("/") + "/api/v2/alerts", json=body,
                                timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                log.error("Alertmanager refused alert %s: HTTP %d %s", labels.get("alertname"), resp.status,
                          (await resp.text())[:200])
                return False
            return True
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        log.error("cannot post alert %s to Alertmanager at %s: %s", labels.get("alertname"), base_url, err)
        return False


def host_matcher(host: str, fleet: bool) -> dict[str, object]:
    """A silence matcher (API v2 shape) for the alerts of this host: its ``host`` label is
    ``host``, or, in single-host mode, absent (an empty regex alternative matches a
    missing label). Every character but a letter, digit, ``_`` and ``-`` is escaped: RE2
    (Alertmanager's regexes) takes an escaped punctuation character as itself."""
    literal = "".join(c if c.isalnum() or c in "_-" else f"\\{c}" for c in host)
    return {"name": HOST_LABEL, "value": literal if fleet else f"({literal})?", "isRegex": True, "isEqual": True}


async def silence(session: aiohttp.ClientSession, base_url: str, labels: dict[str, str], duration: timedelta,
                  comment: str, *matchers: dict[str, object]) -> str | None:
    """Create a silence for alerts with exactly these labels (and ``matchers``, API v2
    matcher objects); its id, or None (logged)."""
    now = datetime.now(UTC)
    body = {"matchers": [*({"name": k, "value": v, "isRegex": False, "isEqual": True} for k, v in labels.items()),
                         *matchers],
            "startsAt": now.isoformat(), "endsAt": (now + duration).isoformat(),
            "createdBy": "caretaker-receiver", "comment": comment}
    try:
        async with session.post(base_url.rstrip("/") + "/api/v2/silences", json=body,
                                timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                log.error("Alertmanager refused the silence: HTTP %d %s", resp.status, (await resp.text())[:200])
                return None
            return str((await resp.json())["silenceID"])
    except (aiohttp.ClientError, OSError, TimeoutError, KeyError, ValueError) as err:
        log.error("cannot create a silence in Alertmanager at %s: %s", base_url, err)
        return None


async def expire_silence(session: aiohttp.ClientSession, base_url: str, silence_id: str) -> bool:
    """Expire a silence now; True when Alertmanager did. Never raises."""
    try:
        async with session.delete(f"{base_url.rstrip('/')}/api/v2/silence/{silence_id}",
                                  timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        log.error("cannot expire silence %s: %s", silence_id, err)
        return False
