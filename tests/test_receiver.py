"""The receiver's webhook: validation, auth, dedupe, decisions, audit trail, metrics."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.config import ConfigError
from receiver.app import EXECUTOR_KEY, REGISTRY_KEY, create_app

from .helpers import AUTH, TOKEN, Client, MakeConfig, alert, audit, idle_service, notification, settle, sleeper


@pytest.fixture
def receiver(receiver_for: Any, make_config: MakeConfig) -> Callable[..., Awaitable[Client]]:
    """receiver(dry_run=False, **receiver_settings) -> a started receiver of two services:
    ``app``, which it may restart, and ``watched_only``, which it may not."""
    async def make(dry_run: bool = False, **settings: Any) -> Client:
        config = make_config({"app": sleeper(), "watched_only": idle_service(processes={"min": 0, "max": 1})},
                             token=True, **settings)
        client: Client = await receiver_for(config, dry_run=dry_run)
        return client
    return make


async def post(client: Client, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    resp = await client.post("/alerts", data=data, headers={"Content-Type": "application/json", **AUTH,
                                                             **(headers or {})})
    return resp.status, await resp.json()


def metric(client: Client, name: str, **labels: str) -> float | None:
    return client.server.app[REGISTRY_KEY].get_sample_value(name, labels)


# --- request validation -----------------------------------------------------------------

async def test_missing_or_wrong_token_is_401(receiver: Any) -> None:
    client = await receiver()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        resp = await client.post("/alerts", json=notification(), headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert "missing or wrong credentials" == (await resp.json())["error"]
    assert (await client.get("/api/v1/remediations")).status == 401
    assert (await client.get("/metrics")).status == 200  # for Prometheus, no secrets in it


async def test_wrong_content_type_is_415(receiver: Any) -> None:
    client = await receiver()
    resp = await client.post("/alerts", data=json.dumps(notification()), headers={**AUTH, "Content-Type": "text/plain"})
    assert resp.status == 415
    assert "application/json" in (await resp.json())["error"]


async def test_oversized_body_is_413(receiver: Any) -> None:
    client = await receiver(max_body_bytes=4096)
    status, body = await post(client, notification(alert(labels_pad="x" * 5000)))
    assert status == 413
    assert "4096" in body["error"]


@pytest.mark.parametrize(("body", "reason"), [
    ("{not json", "not valid JSON"),
    ("[]", "not an Alertmanager webhook payload"),
    (json.dumps({"version": "3", "status": "firing", "alerts": []}), "version"),
    (json.dumps(notification(alert(starts_at="yesterday"))), "alerts.0.startsAt"),
    (json.dumps(notification(alert(starts_at="2026-11-22T03:00:00"))), "alerts.0.startsAt: Input should have timezone"),
    (json.dumps(notification({**alert(), "labels": {"service_name": 5}})), "alerts.0.labels.service_name"),
    (json.dumps(notification({**alert(), "fingerprint": "../../etc/passwd"})), "alerts.0.fingerprint"),
    (json.dumps(notification({**alert(), "status": "exploded"})), "alerts.0.status"),
    ("[" * 100 + "]" * 100, "not an Alertmanager webhook payload"),
    ('{"version": "4", "extra": ' + "[" * 300 + "]" * 300 + "}", "recursion limit exceeded"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
])
async def test_bad_payload_is_400_with_a_reason(receiver: Any, body: str, reason: str) -> None:
    client = await receiver()
    status, answer = await post(client, body)
    assert status == 400
    assert reason in answer["error"]
    assert await audit(client) == []
    assert metric(client, "caretaker_webhook_requests_total", code="400") == 1


async def test_unknown_fields_are_accepted(receiver: Any) -> None:
    client = await receiver()
    payload = notification({**alert(service_name="watched_only"), "silenceURL": "x", "values": {"A": 1}},
                           notification_reason="new", routeLabels={"team": "a"})
    status, answer = await post(client, payload)
    assert status == 200
    assert answer == {"status": "success", "received": 1, "duplicates": 0, "queued": 0, "skipped": 1}


async def test_skipped_alerts_are_counted_by_a_fixed_set_of_reasons(receiver: Any) -> None:
    client = await receiver()
    text = await (await client.get("/metrics")).text()
    reasons = re.findall(r'^caretaker_alerts_skipped_total\{reason="([a-z_]+)",service_name="app"\} 0\.0$', text, re.M)
    assert reasons == [  # label values of a contract: dashboards and alert rules use them
        "duplicate", "resolved", "no_remediation", "no_service_name", "unknown_service", "unknown_action",
        "action_not_allowed", "cooldown", "budget_exhausted", "dry_run", "receiver_restarted", "in_progress",
        "shared_state_error", "condition_cleared", "dependency_unhealthy", "paused", "escalated", "backoff",
        "invalid_label", "other_host", "no_host"]


async def test_the_same_start_in_another_time_zone_is_a_duplicate(receiver: Any) -> None:
    client = await receiver()
    _, first = await post(client, notification(alert("f00d", starts_at="2026-11-22T03:00:00Z",
                                                     service_name="watched_only")))
    _, again = await post(client, notification(alert("f00d", starts_at="2026-11-22T04:00:00.000000+01:00",
                                                     service_name="watched_only")))
    _, later = await post(client, notification(alert("f00d", starts_at="2026-11-22T03:00:00.000001Z",
                                                     service_name="watched_only")))
    assert (first["skipped"], again["duplicates"], later["skipped"]) == (1, 1, 1)
    entries = await audit(client)
    # the dedupe key's text form, unchanged since the first state files: UTC, microseconds
    assert [e["starts_at"] for e in entries] == ["2026-11-22T03:00:00.000001+00:00", "2026-11-22T03:00:00.000000+00:00"]


# --- decisions ------------------------------------------------------------------------

async def test_restart_runs_once_and_duplicates_are_counted_not_repeated(receiver: Any) -> None:
    client = await receiver()
    payload = notification(alert(service_name="app", remediation="restart"))
    status, first = await post(client, payload)
    assert (status, first["queued"]) == (200, 1)
    for _ in range(3):  # Alertmanager resends firing alerts with every group notification
        status, again = await post(client, payload)
        assert (status, again["queued"], again["duplicates"]) == (200, 0, 1)
    await settle(client)
    entries = await audit(client)
    assert len(entries) == 1
    (entry,) = entries
    assert (entry["decision"], entry["result"], entry["times_seen"]) == ("acted", "success", 4)
    assert entry["steps"][-1]["message"].startswith("verified: 1 processes")
    assert metric(client, "caretaker_remediations_total", action="restart", service_name="app", result="success") == 1
    assert metric(client, "caretaker_alerts_skipped_total", service_name="app", reason="duplicate") == 3
    assert metric(client, "caretaker_remediation_duration_seconds_count", action="restart") == 1


@pytest.mark.parametrize(("labels", "status", "reason"), [
    ({"service_name": "app", "remediation": "restart"}, "resolved", "resolved"),
    ({"remediation": "restart"}, "firing", "no_service_name"),
    ({"service_name": "ghost", "remediation": "restart"}, "firing", "unknown_service"),
    ({"service_name": "app"}, "firing", "no_remediation"),
    ({"service_name": "app", "remediation": "reboot"}, "firing", "unknown_action"),
    ({"service_name": "watched_only", "remediation": "restart"}, "firing", "action_not_allowed"),
])
async def test_decisions_that_do_not_repair(receiver: Any, labels: dict[str, str], status: str, reason: str) -> None:
    client = await receiver()
    code, answer = await post(client, notification(alert(status=status, **labels)))
    assert (code, answer["queued"], answer["skipped"]) == (200, 0, 1)
    (entry,) = await audit(client)
    assert entry["reason"] == reason
    assert entry["decision"] in ("skipped", "recorded")
    assert entry["result"] is None and entry["started_at"] is None


async def test_hostile_label_values_are_never_executed(receiver: Any, tmp_path: Path) -> None:
    client = await receiver()
    canary = tmp_path / "pwned"
    evil = f"app; touch {canary}"
    for i, labels in enumerate([{"service_name": evil, "remediation": "restart"},
                                {"service_name": "app", "remediation": f"restart && touch {canary}"},
                                {"service_name": "../../etc", "remediation": "$(touch " + str(canary) + ")"}]):
        code, answer = await post(client, notification(alert(fingerprint=f"f{i}", **labels)))
        assert (code, answer["queued"]) == (200, 0)
    await settle(client)
    assert not canary.exists()
    # Alerts that can never be acted on are one audit row per reason and hour, with a count.
    rows = sorted((e["reason"], e["times_seen"], e["fingerprint"]) for e in await audit(client))
    assert rows == [("unknown_action", 1, "~unknown_action"), ("unknown_service", 2, "~unknown_service")]
    assert all(e["service_name"] == "" for e in await audit(client) if e["reason"] == "unknown_service")
    assert metric(client, "caretaker_alerts_skipped_total", service_name="", reason="unknown_service") == 2


async def test_the_audit_trail_is_bounded(receiver: Any) -> None:
    client = await receiver(audit_retention={"max_age": "1h", "max_entries": 1000})
    for batch in range(3):  # 1500 resolved alerts: recorded, one row each
        alerts = [alert(f"r{batch}x{i}", status="resolved", service_name="app", remediation="restart")
                  for i in range(500)]
        assert (await post(client, notification(*alerts)))[0] == 200
    executor = client.server.app[EXECUTOR_KEY]
    assert len(await audit(client, limit="1000")) == 1000
    assert await executor.prune() == 500
    entries = await audit(client, limit="1000")
    assert len(entries) == 1000 and entries[-1]["fingerprint"] == "r1x0"  # the oldest went first
    db = sqlite3.connect(executor.store.path)  # age some rows by two hours, as time would
    with db:
        db.execute("UPDATE remediations SET received_at = ? WHERE fingerprint LIKE 'r1x%'", (time.time() - 7200,))
    db.close()
    assert await executor.prune() == 500
    assert {e["fingerprint"][:2] for e in await audit(client, limit="1000")} == {"r2"}


async def test_a_full_state_file_is_503_and_loses_nothing(receiver: Any) -> None:
    client = await receiver()
    store = client.server.app[EXECUTOR_KEY].store
    # SQLite's own limit on the file's size gives the error a full disk gives.
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    body = notification(*(alert(f"f{i}", service_name="watched_only", filler="x" * 2000) for i in range(50)))
    status, answer = await post(client, body)
    assert status == 503 and "database or disk is full" in answer["error"]
    assert await audit(client) == []  # the batch rolled back whole
    assert metric(client, "caretaker_webhook_requests_total", code="503") == 1
    store._db.execute("PRAGMA max_page_count = 1073741823")
    status, answer = await post(client, body)  # Alertmanager's retry
    assert (status, answer["received"], answer["duplicates"], answer["skipped"]) == (200, 50, 0, 50)
    assert len(await audit(client, limit="1000")) == 50


async def test_dry_run_decides_but_does_not_repair(receiver: Any) -> None:
    client = await receiver(dry_run=True)
    await post(client, notification(alert(service_name="app", remediation="restart")))
    await settle(client)
    (entry,) = await audit(client)
    assert (entry["decision"], entry["reason"], entry["steps"]) == ("skipped", "dry_run", [])


def test_refuses_non_loopback_without_auth(make_config: MakeConfig) -> None:
    config = make_config(service=idle_service(), listen_address="0.0.0.0")
    with pytest.raises(ConfigError, match="not loopback"):
        create_app(config)


def test_missing_token_file_is_a_config_error(make_config: MakeConfig) -> None:
    config = make_config(service=idle_service(), bearer_token={"file": "absent"})
    with pytest.raises(ConfigError, match="cannot read secret"):
        create_app(config)
