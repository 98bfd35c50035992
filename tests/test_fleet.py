"""Many hosts (docs/fleet.md): each receiver repairs only its own host.

Unit: the host check in decide(), the config keys. With real processes: a receiver in
fleet mode records and skips what names another host or none, repairs what names its
own; a Redis shared by several hosts keeps each host's budget apart; a real
Alertmanager silences only this host's alerts. Assets: the fleet Prometheus config
(promtool), the route generator (scripts/fleet-alertmanager.py), the dashboards' host
variable. End to end: three hosts on loopback, one Prometheus, two clustered
Alertmanagers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from demo.stack import Fleet, Stack
from exporter.client import send
from exporter.config import ConfigError, parse_config
from receiver.alertmanager import host_matcher, silence
from receiver.app import REGISTRY_KEY
from receiver.payload import SKIP_REASONS, Alert, decide

from .helpers import (
    AUTH,
    AUTH_TOKEN,
    FLEET_DIR,
    FLEET_SCRIPT,
    REPO,
    MakeConfig,
    alert,
    core_panels_without_data,
    free_port,
    log_tails,
    notification,
    pids,
    require_binary,
    run,
    settle,
    sleeper,
    wait_for,
    wait_until,
)

# --- the host check (receiver/payload.py decide) ---------------------------------------------

def one_service(**receiver: Any) -> Any:
    return parse_config({"receiver": {"host": "web-1", **receiver},
                         "services": {"redis": {"match": {"comm": "^redis-server$"},
                                                "start": {"argv": ["redis-server"]},
                                                "remediation": {"allow": ["restart"]}}}})


@pytest.mark.parametrize(("fleet", "host", "status", "reason"), [
    (False, None, "firing", ""),                # a single host: an alert without the label is its own
    (False, "web-1", "firing", ""),
    (False, "web-2", "firing", "other_host"),   # ...but one naming another host never is
    (False, "", "firing", ""),                  # an empty label is no label, as in Prometheus
    (False, "web-2", "resolved", "other_host"),  # nor its resolved notification (it closes nothing here)
    (False, "web-1", "resolved", "resolved"),
    (True, None, "firing", "no_host"),
    (True, "", "firing", "no_host"),
    (True, None, "resolved", "no_host"),
    (True, "web-1", "firing", ""),
    (True, "WEB-1", "firing", "other_host"),    # names are compared exactly
    (True, "web-2", "firing", "other_host"),
])
def test_decide_acts_only_on_this_hosts_alerts(fleet: bool, host: str | None, status: str, reason: str) -> None:
    labels = {"alertname": "CaretakerServiceDown", "service_name": "redis", "remediation": "restart"}
    if host is not None:
        labels["host"] = host
    a = Alert.model_validate(alert("f1", status=status, **labels))
    decision = decide(a, one_service(fleet=fleet))
    assert decision.reason == reason
    assert (decision.service_name, decision.action) == ("redis", "restart")  # the audit row still names them


def test_another_hosts_alert_is_other_host_whatever_else_is_wrong_with_it() -> None:
    a = Alert.model_validate(alert("f1", service_name="ghost", remediation="restart", host="web-2"))
    assert decide(a, one_service()).reason == "other_host"
    assert {"other_host", "no_host"} <= set(SKIP_REASONS)


def test_host_defaults_to_the_machines_name_and_is_checked() -> None:
    config = parse_config({"services": {"a": {"match": {"comm": "x"}}}})
    assert config.receiver.host == socket.gethostname()
    assert config.receiver.fleet is False
    with pytest.raises(ConfigError) as err:
        parse_config({"receiver": {"host": "web 1", "fleet": "sometimes"}, "services": {"a": {"match": {"comm": "x"}}}})
    text = str(err.value)
    assert "receiver.host" in text and "receiver.fleet" in text


# --- a receiver in fleet mode, with real processes ----------------------------------------------

@pytest.fixture
def config_for(make_config: MakeConfig) -> MakeConfig:
    """The configs of these receivers: the token, and a waiting problem looked at again every 200 ms."""
    return functools.partial(make_config, token=True, recheck_interval="200ms")


def skipped(client: Any, reason: str) -> float | None:
    value: float | None = client.server.app[REGISTRY_KEY].get_sample_value(
        "caretaker_alerts_skipped_total", {"service_name": "svc", "reason": reason})
    return value


async def test_fleet_receiver_skips_other_hosts_and_unlabelled_alerts_and_repairs_its_own(
        receiver_for: Any, config_for: MakeConfig) -> None:
    config = config_for({"svc": sleeper()}, host="web-1", fleet=True)
    client = await receiver_for(config)
    misrouted = [alert(f"m{i}", service_name="svc", remediation="restart", host="web-2") for i in range(3)]
    resp = await client.post("/alerts", json=notification(*misrouted, alert("n1", service_name="svc",
                                                                            remediation="restart")), headers=AUTH)
    assert (await resp.json())["skipped"] == 4
    entries = await settle(client)
    assert pids(config, "svc") == [], "nothing started for another host's alert"
    rows = {e["reason"]: e for e in entries}
    assert set(rows) == {"other_host", "no_host"}  # one audit row per reason and hour, with a count
    assert (rows["other_host"]["times_seen"], rows["other_host"]["decision"]) == (3, "skipped")
    assert rows["other_host"]["service_name"] == "svc" and rows["other_host"]["action"] == "restart"
    assert (skipped(client, "other_host"), skipped(client, "no_host")) == (3, 1)
    problems = (await (await client.get("/api/v1/problems", headers=AUTH)).json())
    assert problems["data"] == [] and problems["host"] == "web-1"

    # The same alert naming this host is repaired; another host's resolved notification
    # with the same fingerprint closes nothing here.
    await client.post("/alerts", json=notification(alert("own", service_name="svc", remediation="restart",
                                                         host="web-1")), headers=AUTH)
    await wait_until(lambda: len(pids(config, "svc")) == 1, 20, what="the service started")
    await client.post("/alerts", json=notification(alert("own", status="resolved", service_name="svc",
                                                         remediation="restart", host="web-2")), headers=AUTH)
    await settle(client)
    (problem,) = (await (await client.get("/api/v1/problems", headers=AUTH)).json())["data"]
    assert problem["fingerprint"] == "own" and problem["state"] == "open"
    assert skipped(client, "other_host") == 4


async def test_single_host_receiver_takes_unlabelled_alerts_but_not_another_hosts(
        receiver_for: Any, config_for: MakeConfig) -> None:
    config = config_for({"svc": sleeper()}, host="web-1")
    client = await receiver_for(config)
    await client.post("/alerts", json=notification(alert("o1", service_name="svc", remediation="restart",
                                                         host="web-2")), headers=AUTH)
    await settle(client)
    assert pids(config, "svc") == []
    await client.post("/alerts", json=notification(alert("s1", service_name="svc", remediation="restart")),
                      headers=AUTH)
    await wait_until(lambda: len(pids(config, "svc")) == 1, 20, what="the service started")
    entries = await settle(client)
    assert [(e["reason"], e["decision"]) for e in entries if e["fingerprint"] == "~other_host"] == [
        ("other_host", "skipped")]


async def test_plan_and_metrics_say_which_host_the_receiver_repairs(receiver_for: Any,
                                                                   config_for: MakeConfig) -> None:
    config = config_for({"svc": sleeper()}, host="web-1", fleet=True)
    client = await receiver_for(config)
    payload = notification(alert("p1", service_name="svc", remediation="restart", host="web-2"),
                           alert("p2", service_name="svc", remediation="restart"),
                           alert("p3", service_name="svc", remediation="restart", host="web-1"))
    body = await (await client.post("/api/v1/plan", json=payload, headers=AUTH)).json()
    assert (body["host"], body["fleet"]) == ("web-1", True)
    assert [(p["host"], p["would"], p["reason"]) for p in body["data"]] == [
        ("web-2", "skip", "other_host"), (None, "skip", "no_host"), ("web-1", "repair", "")]
    assert await settle(client) == []  # a plan records nothing
    registry = client.server.app[REGISTRY_KEY]
    assert registry.get_sample_value("caretaker_receiver_info", {"receiver_host": "web-1", "fleet": "true"}) == 1


async def test_caretakerctl_problems_names_the_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aiohttp.test_utils import TestServer

    from exporter.config import load_config
    from receiver.app import create_app
    from receiver.ctl import main as ctl

    port = free_port()
    (tmp_path / "token").write_text(AUTH_TOKEN)
    (tmp_path / "caretaker.yml").write_text(
        f"receiver: {{port: {port}, host: db-7, fleet: true, bearer_token: {{file: token}}, state_file: s.sqlite}}\n"
        "services:\n  svc: {match: {comm: '^caretaker-none$'}, processes: {min: 0, max: 1}}\n")
    server = TestServer(create_app(load_config(tmp_path / "caretaker.yml")), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        await asyncio.to_thread(ctl, ["--config", str(tmp_path / "caretaker.yml"), "problems"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("   ID SERVICE") and out[-1] == "host: db-7"
    finally:
        await server.close()


async def test_hosts_sharing_one_redis_keep_their_own_budgets(receiver_for: Any, redis_port: int,
                                                              config_for: MakeConfig, tmp_path: Path) -> None:
    """In fleet mode the host follows receiver.shared_state.key_prefix: host a's repair
    neither holds nor spends host b's lock and budget, with the same prefix configured."""
    port = redis_port
    prefix = f"fleet-{uuid.uuid4().hex[:8]}:"
    clients, configs = [], []
    for host in ("host-a", "host-b"):
        (tmp_path / host).mkdir()
        config = config_for({"svc": sleeper()}, directory=tmp_path / host, host=host, fleet=True,
                            attempts={"max": 1, "window": "1h"}, shared_state={"port": port, "key_prefix": prefix})
        configs.append(config)
        clients.append(await receiver_for(config))
    for client, config, host in zip(clients, configs, ("host-a", "host-b"), strict=True):
        resp = await client.post("/alerts", json=notification(alert(f"f{host[-1]}", service_name="svc",
                                                                    remediation="restart", host=host)), headers=AUTH)
        assert resp.status == 200, await resp.text()
        entries = await settle(client)
        assert [(e["decision"], e["result"]) for e in entries] == [("acted", "success")], entries
        assert len(pids(config, "svc")) == 1
    client = redis.Redis(port=port)
    try:
        keys = [k.decode() for k in client.keys(f"{prefix}*")]
    finally:
        client.close()
    assert {k[len(prefix):].split(":", 1)[0] for k in keys} == {"host-a", "host-b"}, keys


# --- a real Alertmanager: silences and the exhausted alert name the host ------------------------

async def am_get(url: str) -> Any:
    def get() -> Any:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)
    return await asyncio.to_thread(get)


async def am_post(url: str, body: Any) -> None:
    def post() -> int:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    assert await asyncio.to_thread(post) == 200


@pytest.mark.parametrize(("fleet", "silenced"), [(False, {"web-1.example.net", ""}), (True, {"web-1.example.net"})])
async def test_a_repair_silences_only_this_hosts_alerts(alertmanager: str, fleet: bool, silenced: set[str]) -> None:
    service = f"svc-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    alerts = [{"labels": {"alertname": "CaretakerProbeFailing", "service_name": service, **host},
               "startsAt": now.isoformat(), "endsAt": (now + timedelta(minutes=5)).isoformat()}
              for host in ({"host": "web-1.example.net"}, {"host": "web-1xexample.net"}, {"host": "web-2"}, {})]
    await am_post(f"{alertmanager}/api/v2/alerts", alerts)
    async with aiohttp.ClientSession() as session:
        silence_id = await silence(session, alertmanager, {"service_name": service}, timedelta(minutes=1), "test",
                                   host_matcher("web-1.example.net", fleet))
    assert silence_id is not None

    async def states() -> dict[str, str]:
        found = await am_get(f"{alertmanager}/api/v2/alerts?filter=service_name%3D%22{service}%22")
        return {a["labels"].get("host", ""): a["status"]["state"] for a in found}

    async def only_silenced() -> bool:
        return {h for h, s in (await states()).items() if s == "suppressed"} == silenced

    await wait_until(only_silenced, 10, what=f"only {silenced} silenced")
    assert len(await states()) == 4


async def test_the_exhausted_alert_names_the_host(receiver_for: Any, config_for: MakeConfig, alertmanager: str) -> None:
    config = config_for({"svc": sleeper(script="import sys; sys.exit(1)")}, host="web-1", fleet=True,
                        alertmanager_url=alertmanager, attempts={"max": 1, "window": "1h"})
    client = await receiver_for(config)
    await client.post("/alerts", json=notification(alert("x1", service_name="svc", remediation="restart",
                                                         host="web-1")), headers=AUTH)

    async def exhausted() -> list[Any]:
        found = await am_get(f"{alertmanager}/api/v2/alerts?filter=alertname%3D%22CaretakerRepairsExhausted%22")
        return [a for a in found if a["labels"].get("service_name") == "svc"]

    found = await wait_until(exhausted, 30, what="CaretakerRepairsExhausted in Alertmanager")
    assert found[0]["labels"]["host"] == "web-1"


# --- assets: Prometheus, the route generator, the dashboards --------------------------------------

def test_fleet_prometheus_config_is_valid_and_every_target_gets_a_host() -> None:
    promtool = require_binary("promtool")
    result = run([promtool, "check", "config", str(FLEET_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    for job, hosts in (("caretaker-exporter", {"10.0.0.11:8930": "web-1", "10.0.0.12:8930": "web-2",
                                               "db-1:8930": "db-1"}),
                       ("caretaker-receiver", {"10.0.0.11:8931": "web-1", "10.0.0.12:8931": "web-2",
                                               "db-1:8931": "db-1", "db-1:8932": "db-1"})):
        result = run([promtool, "check", "service-discovery", "--timeout=5s", str(FLEET_DIR / "prometheus.yml"), job])
        assert result.returncode == 0, result.stderr
        targets = json.loads(result.stdout)  # in no fixed order
        # The host from the target file, or else from the address (db-1:8930).
        assert {t["labels"]["instance"]: t["labels"]["host"] for t in targets} == hosts


def test_every_alert_has_a_fleet_case_showing_it_keeps_host() -> None:
    rules = yaml.safe_load((REPO / "prometheus" / "rules" / "caretaker-alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    cases = yaml.safe_load((REPO / "prometheus" / "tests" / "caretaker-fleet.test.yml").read_text())["tests"]
    shown = set()
    for case in cases:
        for t in case.get("promql_expr_test", []):
            shown |= {s["labels"].split('alertname="')[1].split('"')[0] for s in t["exp_samples"]
                      if s["labels"].startswith("ALERTS{") and 'host="' in s["labels"]}
        for t in case.get("alert_rule_test", []):
            shown |= {t["alertname"] for a in t.get("exp_alerts") or [] if a["exp_labels"].get("host")}
    assert names <= shown, f"alerts without a promtool case with a host label: {sorted(names - shown)}"


def generate(hosts: dict[str, Any], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    return run([sys.executable, str(FLEET_SCRIPT), *args, str(tmp_path / "hosts.yml")])


def test_generated_routes_leave_everything_else_as_it_was(tmp_path: Path) -> None:
    result = generate({"credentials_file": "/etc/am/token",
                       "hosts": {"web-1": {"urls": ["http://10.0.0.1:8931/alerts"]},
                                 "db-1": {"urls": ["http://10.0.0.2:8931/alerts", "http://10.0.0.2:8932/alerts"],
                                          "credentials_file": "/etc/am/db-token"}}}, tmp_path)
    assert result.returncode == 0, result.stderr
    out, base = yaml.safe_load(result.stdout), yaml.safe_load((REPO / "prometheus" / "alertmanager.yml").read_text())
    routes, base_routes = out["route"].pop("routes"), base["route"].pop("routes")
    assert out["route"] == base["route"] and out["inhibit_rules"] == base["inhibit_rules"]
    assert routes[2:] == base_routes[1:]  # people's routes, unchanged, after the per-host ones
    assert [r["matchers"] for r in routes[:2]] == [['remediation=~".+"', 'host="web-1"'],
                                                   ['remediation=~".+"', 'host="db-1"']]
    assert all(r["continue"] and "host" in r["group_by"] for r in routes[:2])
    receivers = {r["name"]: r for r in out["receivers"]}
    assert "caretaker" not in receivers
    assert [(w["url"], w["http_config"]["authorization"]["credentials_file"])
            for w in receivers["caretaker-db-1"]["webhook_configs"]] == [
        ("http://10.0.0.2:8931/alerts", "/etc/am/db-token"), ("http://10.0.0.2:8932/alerts", "/etc/am/db-token")]
    assert receivers["caretaker-web-1"]["webhook_configs"][0]["http_config"]["authorization"] == {
        "type": "Bearer", "credentials_file": "/etc/am/token"}
    assert all(w["send_resolved"] for r in receivers.values() for w in r.get("webhook_configs", []))
    assert {n: r for n, r in receivers.items() if not n.startswith("caretaker")} == {
        r["name"]: r for r in base["receivers"] if r["name"] != "caretaker"}


@pytest.mark.parametrize(("hosts", "message"), [
    ({"hosts": {"web 1": {"urls": ["http://a/alerts"]}}}, "hosts.web 1: a host name is"),
    ({"hosts": {"web-1": {"urls": []}}}, "hosts.web-1.urls: must be a list"),
    ({"hosts": {"web-1": {"urls": ["ftp://a"]}, "web-2": {"url": "http://b"}}},
     "hosts.web-1.urls[0]: not an http(s) URL"),
    ({"hosts": {}}, "hosts: must map each host name"),
    ({"hosts": {"web-1": {"urls": ["http://a/alerts"]}}, "token": "x"}, "token: unknown key"),
])
def test_a_bad_host_list_is_refused_naming_the_place(tmp_path: Path, hosts: dict[str, Any], message: str) -> None:
    result = generate(hosts, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


def test_a_base_without_the_caretaker_route_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base.yml").write_text("route: {receiver: people}\nreceivers: [{name: people}]\n")
    result = generate({"hosts": {"web-1": {"urls": ["http://a/alerts"]}}}, tmp_path,
                      "--base", str(tmp_path / "base.yml"))
    assert result.returncode == 2
    assert "no route to the receiver 'caretaker'" in result.stderr


def test_the_example_fleet_alertmanager_config_is_what_the_script_makes() -> None:
    result = run([sys.executable, str(FLEET_SCRIPT), "prometheus/fleet/hosts.yml"])
    assert result.returncode == 0, result.stderr
    assert (FLEET_DIR / "alertmanager.yml").read_text() == result.stdout, (
        "run: scripts/fleet-alertmanager.py prometheus/fleet/hosts.yml > prometheus/fleet/alertmanager.yml")


def test_every_dashboard_query_selects_the_host_and_keeps_it() -> None:
    import re

    from grafana.generate import queries

    selector = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
    for board, title, exprs in queries({"host": "HOST", "service_name": ".*"}):
        for expr in exprs:
            found = selector.findall(expr)
            assert found, f"{board}/{title}: {expr}"
            assert all('host=~"HOST"' in labels for _, labels in found), f"{board}/{title}: {expr}"
            for by in re.findall(r"by \(([^)]*)\)", expr):  # every one, histograms' `le` ones too
                assert "host" in by.split(", "), f"{board}/{title}: an aggregation drops host: {expr}"
    for path in sorted((REPO / "grafana" / "dashboards").glob("*.json")):
        variables = json.loads(path.read_text())["templating"]["list"]
        assert [(v["name"], v["allValue"]) for v in variables] == [("host", ".*"), ("service_name", ".*")]


# --- end to end: three hosts, one Prometheus, two clustered Alertmanagers ----------------------

HOSTS = ("host-1", "host-2", "host-3")


class FleetEnv:
    def __init__(self, fleet: Fleet, redis_ports: dict[str, int]) -> None:
        self.fleet = fleet
        self.redis_ports = redis_ports

    def stack(self, host: str) -> Stack:
        return self.fleet.hosts[host]

    def request(self, url: str, token: str | None = None, body: Any = None) -> Any:
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    def receiver(self, host: str, path: str, body: Any = None) -> Any:
        stack = self.stack(host)
        assert stack.token_path is not None
        return self.request(f"http://127.0.0.1:{stack.config.receiver.port}{path}",
                            stack.token_path.read_text().strip(), body)

    def audit(self, host: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.receiver(host, "/api/v1/remediations?limit=500")["data"]
        return data

    def acted(self, host: str, since: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in self.audit(host) if e["decision"] == "acted" and e["received_at"] >= since]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request(
            f"http://127.0.0.1:{self.fleet.prometheus_port}/api/v1/query?"
            + urllib.parse.urlencode({"query": promql}))["data"]["result"]
        return result

    def redis_pids(self, host: str) -> list[int]:
        return pids(self.stack(host).config, "redis")

    def alertmanager_metric(self, port: int, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            lines = resp.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetEnv]:
    redis_bin = require_binary("redis-server")
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    tmp = tmp_path_factory.mktemp("fleet")
    hosts, redis_ports = {}, {}
    for host in HOSTS:
        home = tmp / host
        home.mkdir()
        redis_ports[host] = port = free_port()
        # All hosts share this machine's /proc: each config matches only its own Redis, by port.
        config = {
            "exporter": {"port": free_port()},
            "receiver": {"port": free_port(), "host": host, "fleet": True, "bearer_token": {"file": "secrets/token"},
                         "state_file": "state.sqlite", "cooldown": "2s"},
            "services": {
                "redis": {
                    "match": {"comm": "^redis-server$", "cmdline": f":{port}\\b"},
                    "probes": [{"name": "port", "type": "tcp", "port": port, "timeout": "1s"}],
                    "start": {"argv": [redis_bin, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                       "--appendonly", "no", "--dir", str(home)], "log_file": "logs/redis.log"},
                    "stop": {"grace_period": "5s"},
                    "remediation": {"allow": ["restart"], "verify_timeout": "20s"},
                    # What the dashboards' core panels show.
                    "ports": [port], "data_paths": [str(home)], "logs": [{"path": "logs/redis.log"}],
                    "files": [{"path": "state.json", "format": "json"}],
                },
                # A heartbeat the test feeds once, on a service of its own, so that a restart
                # of Redis is not verified against it.
                "beats": {"match": {"comm": "^caretaker-none$"}, "processes": {"min": 0, "max": 1},
                          "heartbeats": [{"name": "beat", "timeout": "1h"}]},
            },
        }
        (home / "state.json").write_text('{"ok": true}')
        (home / "caretaker.yml").write_text(yaml.safe_dump(config))
        hosts[host] = Stack(home / "caretaker.yml", home / "run")
    stack = Fleet(hosts, tmp / "fleet", prometheus_port=free_port(), alertmanager_ports=(free_port(), free_port()),
                  cluster_ports=(free_port(), free_port()),
                  alertmanager_overrides={"group_interval": "1s", "repeat_interval": "3s"},
                  # Both members notify at once (test 2), and gossip does not tell the second in time.
                  alertmanager_args=("--cluster.peer-timeout=0s", "--cluster.gossip-interval=1s"))
    env = FleetEnv(stack, redis_ports)
    try:
        stack.start()
        stack.wait_ready(90)
        for host in hosts.values():
            assert send("beat", f"http://127.0.0.1:{host.config.exporter.port}")
        wait_for(lambda: {(r["metric"]["job"], r["metric"].get("host")) for r in env.query("up == 1")} == {
            (job, h) for job in ("caretaker-exporter", "caretaker-receiver") for h in HOSTS}, 90, 0.5,
            what="Prometheus scraping the six caretaker programs, each with its host label")
        wait_for(lambda: len(env.query('caretaker_service_health_ratio{service_name="redis"} == 1')) == 3, 60, 0.5,
                 what="each host's Redis healthy in Prometheus")
        for port in stack.alertmanager_ports:
            wait_for(lambda p=port: len(env.request(f"http://127.0.0.1:{p}/api/v2/status")["cluster"]["peers"]) == 2,
                     60, 0.5, what=f"the Alertmanager on {port} to see its peer")
        yield env
    finally:
        stack.stop()
        log_tails(stack.logs(), relative_to=tmp)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_every_receiver_knows_its_host_as_prometheus_labels_it(fleet: FleetEnv) -> None:
    def labels() -> list[tuple[str, str, str]]:  # waited for: one late scrape leaves a gap
        return sorted((r["metric"]["host"], r["metric"]["receiver_host"], r["metric"]["fleet"])
                      for r in fleet.query("caretaker_receiver_info"))
    wait_for(lambda: labels() == [(h, h, "true") for h in HOSTS], 15, 0.5, what="every receiver's info")
    # Pending for a moment at start (a receiver scraped before an exporter), never firing.
    assert not fleet.query('ALERTS{alertname=~"CaretakerReceiverHostMismatch|CaretakerReceiverDown|'
                           'CaretakerExporterDown",alertstate="firing"}')


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_redis_killed_on_host_2_is_restarted_once_by_host_2s_receiver_only(fleet: FleetEnv) -> None:
    before = {h: fleet.redis_pids(h) for h in HOSTS}
    assert all(len(p) == 1 for p in before.values()), before
    received = {p: fleet.alertmanager_metric(p, "alertmanager_alerts_received_total")
                for p in fleet.fleet.alertmanager_ports}
    webhook = 'alertmanager_notifications_total{integration="webhook"}'
    failed = 'alertmanager_notifications_failed_total{integration="webhook"}'

    def delivered() -> dict[int, float]:  # webhook notifications each member delivered
        return {p: fleet.alertmanager_metric(p, webhook) - fleet.alertmanager_metric(p, failed)
                for p in fleet.fleet.alertmanager_ports}

    def alerts_in() -> dict[str, float]:  # alerts each host's receiver took in
        return {h: fleet.alertmanager_metric(fleet.stack(h).config.receiver.port, "caretaker_alerts_received_total")
                for h in HOSTS}

    delivered_before, alerts_before = delivered(), alerts_in()
    broken_at = time.time()
    os.kill(before["host-2"][0], signal.SIGKILL)
    wait_for(lambda: any(e["result"] == "success" for e in fleet.acted("host-2", broken_at)), 120, 0.5,
             what="host-2's receiver to restart its Redis")
    client = redis.Redis(host="127.0.0.1", port=fleet.redis_ports["host-2"], socket_timeout=5)
    try:
        assert client.ping() is True
    finally:
        client.close()
    # Alertmanager resends every 3s while the alert fires; then it resolves.
    wait_for(lambda: not fleet.query('ALERTS{alertname="CaretakerServiceDown"}'), 60, 0.5,
             what="CaretakerServiceDown to resolve")
    # Settled: no notification delivered nor alert taken in over 3 s (three group intervals;
    # the resolved notifications come within one), so the counts below are read at rest.
    last: list[Any] = []

    def at_rest() -> bool:
        now = (delivered(), alerts_in())
        was, last[:] = list(last), [now]
        return was == [now]
    wait_for(at_rest, 60, 3.0, what="the pair's notifications to stop")
    (entry,) = fleet.acted("host-2", broken_at)
    assert (entry["alertname"], entry["service_name"]) == ("CaretakerServiceDown", "redis")
    assert any(s["message"].startswith("started ") for s in entry["steps"])
    (new,) = fleet.redis_pids("host-2")
    assert new != before["host-2"][0]
    for host in ("host-1", "host-3"):
        assert fleet.acted(host, broken_at) == [], f"{host} acted"
        assert fleet.redis_pids(host) == before[host], f"{host}'s Redis changed"
    # Prometheus sent the alert to both members of the pair, and each member delivered it
    # (they notify at once, not one after the other: --cluster.peer-timeout=0s): both
    # notified host-2's receiver, which repaired once. Every alert a receiver took in
    # meanwhile was a Redis alert of host-2 (new rows, each receipt counted in times_seen),
    # so each member's deliveries were of the Redis alert.
    for port, count in received.items():
        assert fleet.alertmanager_metric(port, "alertmanager_alerts_received_total") > count, port
    took = {h: n - alerts_before[h] for h, n in alerts_in().items()}
    assert (took["host-1"], took["host-3"]) == (0, 0), took
    redis_rows = [e for e in fleet.audit("host-2") if e["received_at"] >= broken_at and e["problem_id"] is None]
    assert redis_rows and {(e["service_name"], e["alertname"]) for e in redis_rows} <= {
        ("redis", "CaretakerServiceDown"), ("redis", "CaretakerProbeFailing")}, redis_rows
    assert took["host-2"] == sum(e["times_seen"] for e in redis_rows), (took, redis_rows)
    sent = {p: n - delivered_before[p] for p, n in delivered().items()}
    assert all(n >= 1 for n in sent.values()), f"webhook notifications delivered per member: {sent}"
    print(f"host-2's redis healed in {entry['finished_at'] - broken_at:.2f}s; webhook notifications per "
          f"Alertmanager: {sent}; alerts host-2's receiver took in: {took['host-2']:g}")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_notification_sent_to_the_wrong_receiver_is_other_host_and_changes_nothing(fleet: FleetEnv) -> None:
    # An alert whose condition the receiver cannot observe: without the host check, the
    # receiver would act on it once (restart host-1's Redis), as the last step shows.
    labels = {"alertname": "FleetMisrouted", "service_name": "redis", "remediation": "restart", "severity": "critical"}
    before = {h: fleet.redis_pids(h) for h in HOSTS}
    answer = fleet.receiver("host-1", "/alerts", notification(alert("m1fleet", **labels, host="host-2")))
    assert (answer["queued"], answer["skipped"]) == (0, 1)
    plan = fleet.receiver("host-1", "/api/v1/plan", notification(alert("m2fleet", **labels, host="host-2")))
    assert plan["host"] == "host-1"
    assert [(p["host"], p["would"], p["reason"]) for p in plan["data"]] == [("host-2", "skip", "other_host")]
    time.sleep(3)
    (row,) = [e for e in fleet.audit("host-1") if e["reason"] == "other_host"]
    assert (row["decision"], row["alertname"], row["service_name"]) == ("skipped", "FleetMisrouted", "redis")
    assert fleet.acted("host-1") == [] and fleet.receiver("host-1", "/api/v1/problems")["data"] == []
    assert {h: fleet.redis_pids(h) for h in HOSTS} == before
    wait_for(lambda: fleet.query('caretaker_alerts_skipped_total{host="host-1",reason="other_host"} == 1'), 30, 0.5,
             what="the skip counted in Prometheus")

    # The same notification naming host-1 is host-1's: acted on.
    fleet.receiver("host-1", "/alerts", notification(alert("m3fleet", **labels, host="host-1")))
    wait_for(lambda: any(e["alertname"] == "FleetMisrouted" for e in fleet.acted("host-1")), 60, 0.5,
             what="host-1's receiver to act on its own alert")
    assert fleet.redis_pids("host-2") == before["host-2"] and fleet.redis_pids("host-3") == before["host-3"]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_dashboard_queries_with_one_host_picked_show_only_that_host(fleet: FleetEnv) -> None:
    def only_host_2(board: str, title: str, results: list[dict[str, Any]]) -> None:
        assert {r["metric"]["host"] for r in results if "host" in r["metric"]} <= {"host-2"}, (board, title)

    empty_core = core_panels_without_data(fleet.query, {"host": "host-2", "service_name": ".*"}, only_host_2)
    assert not empty_core, f"core panels without data for host-2: {empty_core}"
