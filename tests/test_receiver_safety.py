"""The receiver under stress: spent budgets (with a real Alertmanager), resets, plans,
basic auth, crashes mid-repair, and generated hostile payloads."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import parse_config
from receiver.app import EXECUTOR_KEY, REGISTRY_KEY, create_app
from receiver.process import start_service

from .helpers import (
    AUTH,
    REPO,
    TOKEN,
    Children,
    Client,
    MakeConfig,
    ManualClock,
    alert,
    build_config,
    free_port,
    idle_service,
    incident,
    make_cert,
    notification,
    port_open,
    post_alerts,
    processes,
    receiver_with_clock,
    settle,
    sleeper,
    stop_services,
    wait_audit,
    wait_for,
    wait_until,
)


async def post(client: Client, payload: Any, path: str = "/alerts", headers: dict[str, str] | None = None) -> Any:
    resp = await client.post(path, json=payload, headers=headers or AUTH)
    return resp.status, await resp.json()


# --- a real Alertmanager -------------------------------------------------------------------

async def am_alerts(url: str, **labels: str) -> list[dict[str, Any]]:
    """Alertmanager's alerts with these labels (API v2)."""
    query = "&".join(f"filter={k}%3D%22{v}%22" for k, v in labels.items())
    return list(await get_json(f"{url}/api/v2/alerts?{query}"))


async def get_json(url: str) -> Any:
    def get() -> Any:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)
    return await asyncio.to_thread(get)


async def test_spent_budget_raises_an_alert_in_alertmanager_until_reset(receiver_for: Any, make_config: MakeConfig,
                                                                        alertmanager: str) -> None:
    config = make_config(service=sleeper(), token=True, alertmanager_url=alertmanager,
                         attempts={"max": 1, "window": "1h"})
    client = await receiver_for(config)
    await incident(client, config, "f1")
    await settle(client)
    await incident(client, config, "f2", previous="f1")
    entries = [e for e in await settle(client) if e["status"] == "firing"]
    assert [e["reason"] for e in entries] == ["budget_exhausted", ""]
    assert not processes(config)
    firing = await am_alerts(alertmanager, alertname="CaretakerRepairsExhausted", service_name="svc")
    assert len(firing) == 1 and firing[0]["status"]["state"] == "active"
    assert firing[0]["labels"]["severity"] == "critical"
    registry = client.server.app[REGISTRY_KEY]
    assert registry.get_sample_value("caretaker_remediation_attempts_exhausted", {"service_name": "svc"}) == 1

    assert (await client.post("/api/v1/services/ghost/reset", headers=AUTH)).status == 404
    status, body = await post(client, None, "/api/v1/services/svc/reset")
    assert (status, body["was_exhausted"]) == (200, True)
    assert registry.get_sample_value("caretaker_remediation_attempts_exhausted", {"service_name": "svc"}) == 0
    async def resolved() -> bool:
        return not await am_alerts(alertmanager, alertname="CaretakerRepairsExhausted", service_name="svc")

    await wait_until(resolved, 10, what="the exhausted alert to resolve")
    # The reset makes the next attempt due at once: the problem still open is repaired, no new alert needed.
    newest = next(e for e in await settle(client) if e["status"] == "firing")
    assert (newest["fingerprint"], newest["decision"], newest["result"]) == ("f2", "acted", "success")
    assert len(processes(config)) == 1


async def test_repairs_resume_once_the_service_has_been_healthy(make_config: MakeConfig) -> None:
    config = make_config(service=sleeper(), token=True, attempts={"max": 1, "window": "1h", "healthy_for": "10m"})
    clock = ManualClock()
    async with receiver_with_clock(config, clock) as client:
        executor = client.server.app[EXECUTOR_KEY]
        await incident(client, config, "f1")
        await settle(client)
        await incident(client, config, "f2", previous="f1")
        await settle(client)
        assert "svc" in executor.exhausted
        executor.ctx.reaper.add(start_service(config, "svc"))  # someone starts it by hand
        await executor.watch_once()  # healthy from now on
        clock.advance(599)
        await executor.watch_once()
        assert "svc" in executor.exhausted  # healthy for a second short of attempts.healthy_for
        clock.advance(1)
        await executor.watch_once()
        assert "svc" not in executor.exhausted  # repairs re-enabled
        registry = client.server.app[REGISTRY_KEY]
        assert registry.get_sample_value("caretaker_remediation_attempts_exhausted", {"service_name": "svc"}) == 0


async def test_the_budget_counts_the_repairs_within_its_window(make_config: MakeConfig) -> None:
    config = make_config(service=sleeper(), token=True, attempts={"max": 1, "window": "10m"})
    clock = ManualClock()
    async with receiver_with_clock(config, clock) as client:
        await incident(client, config, "f1")
        first = next(e for e in await settle(client) if e["status"] == "firing")
        assert (first["fingerprint"], first["result"]) == ("f1", "success")
        clock.advance(601)  # the first repair is out of the window
        await incident(client, config, "f2", previous="f1")
        second = next(e for e in await settle(client) if e["status"] == "firing")
        assert (second["fingerprint"], second["result"]) == ("f2", "success")
        clock.advance(599)  # the second one is still in it
        await incident(client, config, "f3", previous="f2")
        third = next(e for e in await settle(client) if e["status"] == "firing")
        assert (third["fingerprint"], third["decision"], third["reason"]) == ("f3", "skipped", "budget_exhausted")
        assert not processes(config)


async def test_an_exhausted_service_is_tried_again_with_capped_exponential_backoff(make_config: MakeConfig) -> None:
    # It never starts: the command exits at once, and is never the service (it does not match),
    # however slowly it exits on a loaded machine.
    never = sleeper(verify=5, start={"argv": [sys.executable, "-c", "import sys; sys.exit(3)"]})
    config = make_config(service=never, token=True, attempts={"max": 1, "window": "1h"},
                         backoff={"initial": "1m", "max": "4m"})
    clock = ManualClock()
    async with receiver_with_clock(config, clock) as client:
        executor = client.server.app[EXECUTOR_KEY]

        async def attempts() -> list[dict[str, Any]]:
            return [e for e in await settle(client) if e["decision"] == "acted"]

        async def attempts_made(count: int) -> bool:
            return len(await attempts()) >= count

        async def next_attempt_in() -> float:
            resp = await client.get("/api/v1/problems", params={"state": "open"}, headers=AUTH)
            (problem,) = (await resp.json())["data"]
            return float(problem["next_attempt_at"]) - clock()

        await post_alerts(client, alert("f1", service_name="svc", remediation="restart"))
        await wait_audit(client, lambda es: any(e["reason"] == "budget_exhausted" for e in es))
        assert [e["result"] for e in await attempts()] == ["failure"]
        assert await next_attempt_in() == pytest.approx(60)
        for tried, wait in ((1, 60), (2, 120), (3, 240), (4, 240)):  # doubling from 1 m, capped at 4 m
            clock.advance(wait - 1)
            executor.wake("svc")
            assert len(await attempts()) == tried  # a second early: backoff holds it back
            clock.advance(1)
            executor.wake("svc")
            await wait_until(functools.partial(attempts_made, tried + 1), 20,
                             what="an attempt once the backoff was over")
            assert len(await attempts()) == tried + 1
            assert await next_attempt_in() == pytest.approx(min(240, 60 * 2 ** tried))


async def test_a_spent_budget_survives_a_receiver_restart(receiver_for: Any, make_config: MakeConfig) -> None:
    config = make_config(service=sleeper(), token=True, attempts={"max": 1, "window": "1h"},
                         backoff={"initial": "10m"})
    first = await receiver_for(config)
    await incident(first, config, "f1")
    await settle(first)
    await incident(first, config, "f2", previous="f1")
    assert next(e for e in await settle(first) if e["status"] == "firing")["reason"] == "budget_exhausted"
    await first.close()
    second = await receiver_for(config)
    assert "svc" in second.server.app[EXECUTOR_KEY].exhausted
    resp = await second.get("/api/v1/problems", params={"state": "open"}, headers=AUTH)
    (problem,) = (await resp.json())["data"]
    assert problem["fingerprint"] == "f2" and problem["exhausted"] is True
    assert problem["next_attempt_at"] > time.time() + 500  # the backoff kept too: no attempt now
    await settle(second)
    assert not processes(config)


# --- plan, auth, crash ------------------------------------------------------------------------

async def test_plan_says_what_would_happen_and_records_nothing(receiver_for: Any, make_config: MakeConfig) -> None:
    config = make_config(service=sleeper(), token=True, cooldown="1h")
    client = await receiver_for(config)
    payload = notification(alert("p1", service_name="svc", remediation="restart"),
                           alert("p2", service_name="ghost", remediation="restart"),
                           alert("p3", status="resolved", service_name="svc", remediation="restart"))
    status, body = await post(client, payload, "/api/v1/plan")
    assert status == 200
    assert [(p["would"], p["reason"]) for p in body["data"]] == [
        ("repair", ""), ("skip", "unknown_service"), ("skip", "resolved")]
    assert await settle(client) == []
    assert body["data"][0]["observation"]["processes"] == 0
    await post_alerts(client, alert("p1", service_name="svc", remediation="restart"))
    await settle(client)
    status, body = await post(client, notification(alert("p1", service_name="svc", remediation="restart")),
                              "/api/v1/plan")
    assert [p["reason"] for p in body["data"]] == ["condition_cleared"]  # it runs now
    await stop_services(config)
    status, body = await post(client, notification(alert("p9", service_name="svc", remediation="restart")),
                              "/api/v1/plan")
    assert [p["reason"] for p in body["data"]] == ["cooldown"]
    assert not processes(config)  # a plan changes nothing
    assert (await client.post("/api/v1/plan", json=notification())).status == 401


async def test_basic_auth(receiver_for: Any, make_config: MakeConfig, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("correct horse\n")
    config = make_config(service=idle_service(), basic_auth={"username": "am", "password": {"file": "pw"}})
    client = await receiver_for(config)
    good = base64.b64encode(b"am:correct horse").decode()
    bad = base64.b64encode(b"am:wrong").decode()
    assert (await post(client, notification(), headers={"Authorization": f"Basic {good}"}))[0] == 200
    resp = await client.post("/alerts", json=notification(), headers={"Authorization": f"Basic {bad}"})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    assert (await client.post("/alerts", json=notification(), headers={"Authorization": f"Bearer {good}"})).status \
        == 401


# --- generated hostile payloads ---------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                              max_size=4), max_leaves=20)
LABEL_VALUES = st.text(max_size=40) | st.sampled_from(["svc", "restart", "; rm -rf /", "$(id)", "../../etc/passwd",
                                                       "`id`", "a\nb", "\x00"])
ALERTS = st.fixed_dictionaries({
    "status": st.sampled_from(["firing", "resolved", "weird"]),
    "labels": st.dictionaries(st.sampled_from(["alertname", "service_name", "remediation", "x"]), LABEL_VALUES,
                              max_size=4),
    "startsAt": st.sampled_from(["2026-11-22T03:00:00Z", "not a time", "2026-11-22T03:00:00"]),
    "fingerprint": st.text(max_size=70) | st.just("abc123")},
    optional={"annotations": JSON, "extra": JSON})
PAYLOADS = JSON | st.fixed_dictionaries(
    {"version": st.sampled_from(["4", "3", 4]), "status": st.sampled_from(["firing", "resolved"]),
     "alerts": st.lists(ALERTS, max_size=5)}, optional={"groupKey": JSON, "truncatedAlerts": JSON})


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, asyncio.AbstractEventLoop]]:
    config = build_config(tmp_path_factory.mktemp("fuzz"), service=idle_service(), token=True, cooldown="1h")
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(create_app(config), host="127.0.0.1"), loop=loop)
    loop.run_until_complete(client.start_server())
    yield client, loop
    loop.run_until_complete(client.close())
    loop.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=PAYLOADS)
def test_generated_payloads_never_crash_nor_repair(fuzz_target: tuple[Client, asyncio.AbstractEventLoop],
                                                   payload: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, loop = fuzz_target

    async def go() -> tuple[int, Any]:
        resp = await client.post("/alerts", data=json.dumps(payload), headers={**AUTH,
                                                                                 "Content-Type": "application/json"})
        return resp.status, await resp.json()

    status, body = loop.run_until_complete(go())
    assert status in (200, 400), body
    if status == 400:
        assert body["status"] == "error" and body["error"]
    else:
        assert body["queued"] == 0  # the only configured service allows no repair
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# --- rules in Alertmanager's matcher syntax, and silences ------------------------------------------

def test_rules_use_alertmanager_matcher_syntax() -> None:
    from exporter.config import ConfigError, parse_matchers
    ms = parse_matchers('{alertname="Caretaker\\"X", service_name=~"api|worker", severity!="info", job!~"test.*"}')
    assert [(m.name, m.op, m.value) for m in ms] == [
        ("alertname", "=", 'Caretaker"X'), ("service_name", "=~", "api|worker"), ("severity", "!=", "info"),
        ("job", "!~", "test.*")]
    labels = {"alertname": 'Caretaker"X', "service_name": "api", "severity": "critical", "job": "prod"}
    assert all(m.matches(labels) for m in ms)
    assert not parse_matchers('service_name=~"api|worker"')[0].matches({"service_name": "api2"})  # anchored
    for bad in ('alertname=="x"', "service_name=~\"(\"", "", "a b"):
        with pytest.raises(ConfigError, match=r"receiver.rules\[0\].match"):
            parse_config({"receiver": {"rules": [{"match": bad, "steps": ["restart"]}]},
                          "services": {"a": {"match": {"comm": "x"}}}})


async def test_rule_steps_run_in_order_and_stop_at_the_first_failure(receiver_for: Any, make_config: MakeConfig,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "w.log").write_text("a line\n")
    svc = sleeper(logs=[{"path": "w.log"}], remediation={
        "allow": ["rotate_logs", "restart", "http"], "verify_timeout": 10,
        "http": {"url": f"http://127.0.0.1:{free_port()}/reset", "timeout": 1}})
    config = make_config(service=svc, token=True,
                         rules=[{"match": 'alertname="Leak"', "steps": ["rotate_logs", "restart"]},
                                {"match": 'alertname="Stuck"', "steps": ["http", "restart"]}])
    client = await receiver_for(config)
    await post_alerts(client, alert("r1", alertname="Leak", service_name="svc"))
    (leak,) = await settle(client)
    assert (leak["action"], leak["result"]) == ("rotate_logs,restart", "success")
    messages = [s["message"] for s in leak["steps"]]
    assert messages.index("step rotate_logs") < messages.index("step restart")
    assert (tmp_path / "w.log.1").read_text() == "a line\n"
    await post_alerts(client, alert("r2", alertname="Stuck", service_name="svc"))
    stuck = (await settle(client))[0]
    assert stuck["result"] == "failure"
    assert "step restart" not in [s["message"] for s in stuck["steps"]]


async def test_alerts_are_silenced_while_the_service_is_restarted(receiver_for: Any, make_config: MakeConfig,
                                                                  alertmanager: str) -> None:
    config = make_config(service=sleeper(), token=True, alertmanager_url=alertmanager, silence_during_repair=True)
    client = await receiver_for(config)
    await post_alerts(client, alert("s1", service_name="svc", remediation="restart"))
    (entry,) = await settle(client)
    assert entry["result"] == "success"
    silence_id = entry["steps"][0]["message"].split("(")[-1].rstrip(")")
    made = await get_json(f"{alertmanager}/api/v2/silence/{silence_id}")
    # This host's alerts only: its host label, or none (a single host's alerts may carry none).
    own = config.receiver.host.replace(".", "\\.")
    assert made["matchers"] == [{"name": "service_name", "value": "svc", "isRegex": False, "isEqual": True},
                                {"name": "host", "value": f"({own})?", "isRegex": True, "isEqual": True}]
    assert made["status"]["state"] == "expired"  # lifted once the repair was done
    assert entry["steps"][-1]["message"] == f"silence {silence_id} expired"


def test_receiver_serves_https_when_configured(tmp_path: Path) -> None:
    import ssl
    import subprocess

    cert, key = make_cert(tmp_path)
    port = free_port()
    (tmp_path / "token").write_text(TOKEN)
    config = {"receiver": {"port": port, "bearer_token": {"file": "token"}, "state_file": "s.sqlite",
                           "header_timeout": "1s", "tls": {"cert_file": str(cert), "key_file": str(key)}},
              "services": {"a": {"match": {"comm": "^nothing$"}}}}
    path = tmp_path / "caretaker.yml"
    path.write_text(json.dumps(config))
    children = Children()
    children.start([sys.executable, "-m", "receiver.app", "--config", str(path)], cwd=REPO)
    try:
        wait_for(lambda: port_open(port), 15, what="receiver with TLS")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/-/healthy", context=context, timeout=5) as resp:
            assert resp.status == 200
        with pytest.raises(OSError):  # plain HTTP to the TLS port: the connection is dropped
            urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthy", timeout=5)
        # A client that never starts its handshake is closed after header_timeout (1 s),
        # not asyncio's 60 s: it holds a descriptor the guard does not count until then.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            try:
                assert silent.recv(1) == b""
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail("a client that sent no TLS handshake was kept 10 s")
    finally:
        children.stop_all()
    config["receiver"]["tls"]["key_file"] = str(tmp_path / "missing.pem")  # type: ignore[index]
    path.write_text(json.dumps(config))
    bad = subprocess.run([sys.executable, "-m", "receiver.app", "--config", str(path)], capture_output=True,
                         text=True, timeout=30, cwd=REPO)
    assert bad.returncode == 2 and "receiver.tls" in bad.stderr
