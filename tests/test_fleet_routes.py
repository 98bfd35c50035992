"""Many hosts (docs/fleet.md), the second round: what a review of the first found.

The route generator (scripts/fleet-alertmanager.py) with bases people really have: a
pre-fleet base whose inhibit rules compare no host (a real Alertmanager shows what they
inhibit), a caretaker route without ``continue``, a nested route to ``caretaker``, a
receiver name a host's would take; its own output as its base; ``-o``; host lists YAML
1.1 would misread. Also: the Redis key layout of a receiver, whatever its mode; the
warning, audit detail and alert of a receiver that gets other hosts' alerts; the rules'
host matching (mutants of the shipped rules that promtool must reject); IPv6 targets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import yaml

from receiver.shared import SharedState

from .helpers import (
    AUTH,
    FLEET_DIR,
    FLEET_SCRIPT,
    REPO,
    Children,
    alert,
    build_config,
    free_port,
    notification,
    pids,
    port_open,
    require_binary,
    run,
    settle,
    sleeper,
    wait_for,
    wait_until,
)

PROM = REPO / "prometheus"

# The shipped alertmanager.yml before the fleet work (git show 850dfce:prometheus/alertmanager.yml,
# and what docs/integrating.md showed): its inhibit rules compare service_name only.
PROBES = "CaretakerProbeFailing|CaretakerProbeSlow|CaretakerHealthLow|CaretakerHeartbeatMissing"
PRE_FLEET_BASE = f"""\
route:
  receiver: people
  group_by: [alertname, service_name]
  group_wait: 1s
  group_interval: 5s
  repeat_interval: 4h
  routes:
    - receiver: caretaker
      matchers: ['remediation=~".+"']
      group_wait: 0s
      group_interval: 1s
      repeat_interval: 10m
      continue: true
    - receiver: people-critical
      matchers: [severity="critical"]
      group_wait: 30s
    - receiver: people
      matchers: [severity=~"warning|info"]
      group_wait: 30s
receivers:
  - name: caretaker
    webhook_configs:
      - url: http://127.0.0.1:8931/alerts
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials_file: secrets/receiver-token
  - name: people-critical
  - name: people
inhibit_rules:
  - source_matchers: [alertname="CaretakerServiceDown"]
    target_matchers: ['alertname=~"{PROBES}"']
    equal: [service_name]
  - source_matchers: [alertname="CaretakerProbeFailing"]
    target_matchers: [alertname="CaretakerHealthLow"]
    equal: [service_name]
"""

TWO_HOSTS = {"hosts": {"a": {"urls": ["http://10.0.0.1:8931/alerts"]}, "b": {"urls": ["http://10.0.0.2:8931/alerts"]}}}



def script(tmp_path: Path, *args: str, hosts: Any = None, base: str | None = None,
           **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the script on ``hosts`` (written to hosts.yml) and ``base`` (base.yml), if given."""
    argv = [sys.executable, str(FLEET_SCRIPT)]
    if base is not None:
        (tmp_path / "base.yml").write_text(base)
        argv += ["--base", str(tmp_path / "base.yml")]
    if hosts is not None:
        (tmp_path / "hosts.yml").write_text(hosts if isinstance(hosts, str) else yaml.safe_dump(hosts))
        argv.append(str(tmp_path / "hosts.yml"))
    return run([*argv, *args], **kwargs)


def amtool_check(path: Path) -> None:
    result = run([require_binary("amtool"), "check-config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def routes_test(path: Path, labels: str) -> str:
    result = run([require_binary("amtool"), "config", "routes", "test", "--config.file", str(path), *labels.split()])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def config_for(directory: Path, services: dict[str, Any], **receiver: Any) -> Any:
    """The receiver's token, and a waiting problem looked at again every 200 ms."""
    return build_config(directory, services, token=True, recheck_interval="200ms", **receiver)


# --- 1. inhibit rules compare the host ------------------------------------------------------------

@pytest.fixture
def alertmanager_with(tmp_path: Path) -> Iterator[Any]:
    """alertmanager_with(config_path) -> the URL of a real Alertmanager running that config."""
    binary = require_binary("prometheus-alertmanager", "alertmanager")
    children = Children()

    def start(config: Path) -> str:
        port = free_port()
        data = tmp_path / f"am-{port}"
        data.mkdir()
        children.start([binary, f"--config.file={config}", f"--storage.path={data}",
                        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="])
        wait_for(lambda: port_open(port), 20, what="alertmanager")
        return f"http://127.0.0.1:{port}"

    yield start
    children.stop_all()


def post_alerts(url: str, alerts: list[dict[str, Any]]) -> None:
    req = urllib.request.Request(f"{url}/api/v2/alerts", data=json.dumps(alerts).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def states(url: str) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """``{(alertname, host): (state, receivers)}`` of the alerts Alertmanager holds."""
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
        return {(a["labels"]["alertname"], a["labels"]["host"]): (a["status"]["state"],
                                                                 sorted(r["name"] for r in a["receivers"]))
                for a in json.load(resp)}


def test_a_pre_fleet_bases_inhibit_rules_compare_the_host_in_a_real_alertmanager(
        tmp_path: Path, alertmanager_with: Any) -> None:
    """Redis down on host a inhibits host a's probe alert, and no longer host b's, whose
    repair alert must reach b's receiver."""
    result = script(tmp_path, "-o", str(tmp_path / "am.yml"), hosts=TWO_HOSTS, base=PRE_FLEET_BASE)
    assert result.returncode == 0, result.stderr
    assert "inhibit_rules[0]: equal ['service_name'] lacks host: added it" in result.stderr
    assert "inhibit_rules[1]: equal ['service_name'] lacks host: added it" in result.stderr
    written = yaml.safe_load((tmp_path / "am.yml").read_text())
    assert [r["equal"] for r in written["inhibit_rules"]] == [["host", "service_name"]] * 2
    amtool_check(tmp_path / "am.yml")

    url = alertmanager_with(tmp_path / "am.yml")
    now = datetime.now(UTC)

    def alert(name: str, host: str) -> dict[str, Any]:
        return {"labels": {"alertname": name, "service_name": "redis", "host": host, "severity": "critical",
                           "remediation": "restart"},
                "startsAt": now.isoformat(), "endsAt": (now + timedelta(minutes=5)).isoformat()}

    post_alerts(url, [alert("CaretakerServiceDown", "a"), alert("CaretakerProbeFailing", "a"),
                      alert("CaretakerProbeFailing", "b")])
    expected = {("CaretakerServiceDown", "a"): ("active", ["caretaker-a", "people-critical"]),
                ("CaretakerProbeFailing", "a"): ("suppressed", ["caretaker-a", "people-critical"]),
                ("CaretakerProbeFailing", "b"): ("active", ["caretaker-b", "people-critical"])}
    wait_for(lambda: states(url) == expected, 15, 0.2, what=f"Alertmanager to show {expected}")


def test_inhibit_rules_that_compare_the_host_or_nothing_are_left_as_they_are(tmp_path: Path) -> None:
    second = '\n  - source_matchers: [alertname="CaretakerProbeFailing"]'
    base = PRE_FLEET_BASE.replace(f"equal: [service_name]{second}", f"equal: [host, service_name]{second}")
    base = base.replace("    target_matchers: [alertname=\"CaretakerHealthLow\"]\n    equal: [service_name]\n",
                        "    target_matchers: [alertname=\"CaretakerHealthLow\"]\n")
    result = script(tmp_path, hosts=TWO_HOSTS, base=base)
    assert result.returncode == 0, result.stderr
    assert "inhibit_rules" not in result.stderr
    rules = yaml.safe_load(result.stdout)["inhibit_rules"]
    assert [r.get("equal") for r in rules] == [["host", "service_name"], None]


# --- 4. the base route's `continue` is kept ---------------------------------------------------------

NO_CONTINUE_BASE = """\
route:
  receiver: default
  routes:
    - receiver: caretaker
      matchers: ['remediation=~".+"']
    - receiver: oncall
      matchers: [severity="critical"]
receivers:
  - name: default
  - name: oncall
  - name: caretaker
    webhook_configs:
      - url: http://127.0.0.1:8931/alerts
"""


@pytest.mark.parametrize(("go_on", "receivers"), [(False, "caretaker-a"), (True, "caretaker-a,oncall")])
def test_the_per_host_routes_keep_the_base_routes_continue(tmp_path: Path, go_on: bool, receivers: str) -> None:
    base = NO_CONTINUE_BASE.replace("matchers: ['remediation=~\".+\"']",
                                    "matchers: ['remediation=~\".+\"']\n      continue: true") if go_on \
        else NO_CONTINUE_BASE
    result = script(tmp_path, "-o", str(tmp_path / "am.yml"), hosts=TWO_HOSTS, base=base)
    assert result.returncode == 0, result.stderr
    amtool_check(tmp_path / "am.yml")
    labels = "alertname=CaretakerServiceDown service_name=redis remediation=restart severity=critical"
    assert routes_test(tmp_path / "am.yml", f"{labels} host=a") == receivers
    assert routes_test(tmp_path / "am.yml", f"{labels} host=b") == receivers.replace("-a", "-b")
    # As the base did, with its one caretaker receiver.
    assert routes_test(tmp_path / "base.yml", labels) == receivers.replace("caretaker-a", "caretaker")
    routes = yaml.safe_load((tmp_path / "am.yml").read_text())["route"]["routes"]
    assert [r.get("continue", False) for r in routes] == [go_on, go_on, False]


# --- 5. writing the file: -o, its own output as base, what must not pass ----------------------------

def test_dash_o_writes_only_a_good_file_and_never_the_base(tmp_path: Path) -> None:
    out = tmp_path / "alertmanager.yml"
    out.write_text("# the config Alertmanager runs now\n")
    bad = script(tmp_path, "-o", str(out), hosts={"hosts": {"web 1": {"urls": ["http://a/alerts"]}}})
    assert bad.returncode == 2 and "hosts.web 1: a host name is" in bad.stderr
    assert out.read_text() == "# the config Alertmanager runs now\n", "a failed run left the file as it was"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary file left"

    good = script(tmp_path, "-o", str(out), hosts=TWO_HOSTS)
    assert (good.returncode, good.stdout) == (0, ""), good.stderr
    amtool_check(out)
    assert routes_test(out, "host=b remediation=restart severity=critical") == "caretaker-b,people-critical"

    (tmp_path / "base.yml").write_text(PRE_FLEET_BASE)
    same = script(tmp_path, "-o", str(tmp_path / "." / "base.yml"), hosts=TWO_HOSTS, base=PRE_FLEET_BASE)
    assert same.returncode == 2 and "is the base" in same.stderr
    assert (tmp_path / "base.yml").read_text() == PRE_FLEET_BASE


def test_stdout_redirected_over_the_base_is_named(tmp_path: Path) -> None:
    """`--base X > X`: the shell empties X before the script runs; it says so instead of
    calling the base 'not an Alertmanager configuration'."""
    base = tmp_path / "base.yml"
    base.write_text(PRE_FLEET_BASE)
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(TWO_HOSTS))
    with base.open("w") as out:  # what `> base.yml` does
        result = subprocess.run([sys.executable, str(FLEET_SCRIPT), "--base", str(base), str(tmp_path / "hosts.yml")],
                                stdout=out, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "is also stdout (--base X > X)" in result.stderr and "write with -o" in result.stderr


def test_the_script_takes_its_own_output_as_base_and_gives_the_same_file(tmp_path: Path) -> None:
    first = script(tmp_path, "-o", str(tmp_path / "one.yml"), hosts=TWO_HOSTS, base=PRE_FLEET_BASE)
    assert first.returncode == 0, first.stderr
    again = run([sys.executable, str(FLEET_SCRIPT), "--base", str(tmp_path / "one.yml"), str(tmp_path / "hosts.yml"),
                 "-o", str(tmp_path / "two.yml")])
    assert again.returncode == 0, again.stderr
    assert "inhibit_rules" not in again.stderr  # host is in every equal already
    assert (tmp_path / "two.yml").read_text() == (tmp_path / "one.yml").read_text()

    # A host added to the list: its route and receiver join the others', in place; people's stay.
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"hosts": {**TWO_HOSTS["hosts"],
                                                                  "c": {"urls": ["http://10.0.0.3:8931/alerts"]}}}))
    more = run([sys.executable, str(FLEET_SCRIPT), "--base", str(tmp_path / "two.yml"), str(tmp_path / "hosts.yml"),
                "-o", str(tmp_path / "three.yml")])
    assert more.returncode == 0, more.stderr
    amtool_check(tmp_path / "three.yml")
    from_base = script(tmp_path, hosts=(tmp_path / "hosts.yml").read_text(), base=PRE_FLEET_BASE)
    assert (tmp_path / "three.yml").read_text() == from_base.stdout
    config = yaml.safe_load(from_base.stdout)
    assert [r["receiver"] for r in config["route"]["routes"]] == [
        "caretaker-a", "caretaker-b", "caretaker-c", "people-critical", "people"]
    assert [r["name"] for r in config["receivers"]] == [
        "caretaker-a", "caretaker-b", "caretaker-c", "people-critical", "people"]

    # The shipped example is such a file too.
    example = run([sys.executable, str(FLEET_SCRIPT), "--base", str(FLEET_DIR / "alertmanager.yml"),
                   str(FLEET_DIR / "hosts.yml")])
    assert example.returncode == 0, example.stderr
    assert example.stdout == (FLEET_DIR / "alertmanager.yml").read_text()


@pytest.mark.parametrize(("base", "message"), [
    # A second route to caretaker, nested in people's: it would point at a receiver that is gone.
    (NO_CONTINUE_BASE.replace("    - receiver: oncall\n      matchers: [severity=\"critical\"]\n",
                              "    - receiver: oncall\n      matchers: [severity=\"critical\"]\n      routes:\n"
                              "        - receiver: caretaker\n          matchers: [alertname=\"CaretakerDiskFull\"]\n"),
     "route.routes[1].routes[0]: sends to 'caretaker', which the per-host receivers replace"),
    # The root route itself.
    (NO_CONTINUE_BASE.replace("  receiver: default\n", "  receiver: caretaker\n", 1), "route: sends to 'caretaker'"),
    # A receiver of one's own that a host's would take.
    (NO_CONTINUE_BASE.replace("  - name: oncall\n", "  - name: oncall\n  - name: caretaker-b\n"),
     "receivers: 'caretaker-b' is also the name of a host's receiver (caretaker-HOST): rename yours, or the host"),
    (NO_CONTINUE_BASE.replace("  - name: oncall\n", "  - name: oncall\n  - name: oncall\n"),
     "receivers: 'oncall' is defined 2 times"),
    (NO_CONTINUE_BASE.replace("receiver: oncall", "receiver: pager"), "route.routes[1]: the receiver 'pager' is not "
                                                                      "defined"),
    (NO_CONTINUE_BASE.replace("  routes:\n    - receiver: caretaker\n",
                              "  routes:\n    - receiver: caretaker\n      receiver: default\n"),
     "the key 'receiver' is given twice"),
])
def test_a_base_that_would_give_an_invalid_config_is_refused(tmp_path: Path, base: str, message: str) -> None:
    result = script(tmp_path, "-o", str(tmp_path / "am.yml"), hosts=TWO_HOSTS, base=base)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "am.yml").exists()


@pytest.mark.parametrize(("hosts", "message"), [
    ('hosts:\n  a: {urls: ["http://10.0.0.1:8931/alerts"]}\n  a: {urls: ["http://10.0.0.9:8931/alerts"]}\n',
     "the key 'a' is given twice (first line 2)"),
    ('hosts:\n  web 1: {urls: ["http://10.0.0.1:8931/alerts"]}\n', "hosts.web 1: a host name is"),
    ('hosts:\n  ? [a, b]\n  : {urls: ["http://10.0.0.1:8931/alerts"]}\n', "a mapping key must be a scalar"),
    ('hosts: [a, b]\n', "hosts: must map each host name"),
])
def test_a_bad_host_list_is_refused(tmp_path: Path, hosts: str, message: str) -> None:
    result = script(tmp_path, hosts=hosts)
    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr


def test_host_names_are_kept_as_written(tmp_path: Path) -> None:
    """YAML 1.1 reads `no` as false and `1.10` as 1.1: the host list keeps them as text."""
    hosts = 'hosts:\n  no: {urls: ["http://10.0.0.1:8931/alerts"]}\n  1.10: {urls: ["http://10.0.0.2:8931/alerts"]}\n'
    result = script(tmp_path, "-o", str(tmp_path / "am.yml"), hosts=hosts)
    assert result.returncode == 0, result.stderr
    amtool_check(tmp_path / "am.yml")
    assert routes_test(tmp_path / "am.yml", "host=no remediation=restart severity=critical") == \
        "caretaker-no,people-critical"
    assert routes_test(tmp_path / "am.yml", "host=1.10 remediation=restart severity=critical") == \
        "caretaker-1.10,people-critical"


# --- 11. a host Prometheus scrapes but the host list lacks ------------------------------------------

def test_targets_name_a_host_the_list_lacks(tmp_path: Path) -> None:
    targets = tmp_path / "exporters.yml"
    targets.write_text(yaml.safe_dump([{"targets": ["10.0.0.1:8930"], "labels": {"host": "a"}},
                                       {"targets": ["b:8930", "web-9.example.net:8930"]},
                                       {"targets": ["[2001:db8::1]:8930"]}]))  # no host label: no host
    result = script(tmp_path, "-o", str(tmp_path / "am.yml"), "--targets", str(targets), hosts=TWO_HOSTS)
    assert result.returncode == 2
    assert f"hosts.web-9.example.net: missing, but {targets} has targets of it" in result.stderr
    assert "hosts.a" not in result.stderr and "hosts.b" not in result.stderr
    assert not (tmp_path / "am.yml").exists()

    # The shipped target files and host list agree.
    example = run([sys.executable, str(FLEET_SCRIPT), str(FLEET_DIR / "hosts.yml"), "--targets",
                   *map(str, sorted((FLEET_DIR / "targets").glob("*.yml")))])
    assert example.returncode == 0, example.stderr


# --- 2. the Redis key layout follows the host, in either mode -----------------------------------

async def test_a_pair_switched_to_fleet_mode_one_receiver_at_a_time_still_repairs_once(
        receiver_for: Any, redis_port: int, tmp_path: Path) -> None:
    """A rolling switch of an HA pair: one receiver in fleet mode, the other not yet. Both
    get the alert (as from two Alertmanagers); one claims it, one repair runs."""
    svc = sleeper()
    clients, configs = [], []
    for i, fleet in enumerate((False, True)):
        (tmp_path / f"r{i}").mkdir()
        config = config_for(tmp_path / f"r{i}", {"svc": svc}, host="db-1", fleet=fleet,
                            shared_state={"port": redis_port})
        configs.append(config)
        clients.append(await receiver_for(config))
    payload = notification(alert("same", service_name="svc", remediation="restart", host="db-1"))
    answers = [await (await c.post("/alerts", json=payload, headers=AUTH)).json() for c in clients]
    assert [(a["queued"], a["duplicates"]) for a in answers] == [(1, 0), (0, 0)], answers
    assert answers[1]["skipped"] == 1  # claimed by the other: a duplicate
    await wait_until(lambda: len(pids(configs[0], "svc")) == 1, 20, what="the service started")
    entries = [await settle(c) for c in clients]
    assert [e["decision"] for e in entries[0]] == ["acted"]
    assert [(e["decision"], e["reason"]) for e in entries[1]] == [("skipped", "duplicate")]
    keys = redis.Redis(port=redis_port)
    try:
        assert {k.decode().rsplit(":", 1)[0] for k in keys.keys("*") if b":lock:" not in k} == {
            "caretaker:db-1:alert:same:2026-11-22T03:00:00.000000+00:00", "caretaker:db-1:finished",
            "caretaker:db-1:repairs"}
    finally:
        keys.close()


async def test_hosts_sharing_a_redis_outside_fleet_mode_keep_their_own_budgets(
        receiver_for: Any, redis_port: int, tmp_path: Path) -> None:
    prefix = f"nf-{uuid.uuid4().hex[:8]}:"
    for host in ("host-a", "host-b"):
        (tmp_path / host).mkdir()
        config = config_for(tmp_path / host, {"svc": sleeper()}, host=host, attempts={"max": 1, "window": "1h"},
                            shared_state={"port": redis_port, "key_prefix": prefix})
        client = await receiver_for(config)
        resp = await client.post("/alerts", json=notification(alert(f"f{host[-1]}", service_name="svc",
                                                                    remediation="restart", host=host)), headers=AUTH)
        assert resp.status == 200
        entries = await settle(client)
        assert [(e["decision"], e["result"]) for e in entries] == [("acted", "success")], (host, entries)
        assert len(pids(config, "svc")) == 1
    keys = redis.Redis(port=redis_port)
    try:
        assert {k.decode()[len(prefix):].split(":", 1)[0] for k in keys.keys(f"{prefix}*")} == {"host-a", "host-b"}
    finally:
        keys.close()


async def test_a_receiver_keeping_its_keys_without_the_host_is_named_in_an_error(
        receiver_for: Any, redis_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The other of a pair still on the earlier version (outside fleet mode its keys had
    no host): each repair it starts after this receiver started is an ERROR here; one
    from before (the upgrade's leftovers) is not."""
    import receiver.app

    monkeypatch.setattr(receiver.app, "LAYOUT_CHECK_SECONDS", 0.2)
    caplog.set_level(logging.ERROR, logger="receiver.app")
    earlier = SharedState(aioredis.Redis(port=redis_port), "caretaker:", 3600)  # what that version wrote
    try:
        await earlier.record_start("svc", time.time() - 60)
        await receiver_for(config_for(tmp_path, {"svc": sleeper()}, host="db-1", shared_state={"port": redis_port}))
        await asyncio.sleep(1.0)
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        await earlier.record_start("svc", time.time())
        await wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records), 10, what="an ERROR")
        await asyncio.sleep(0.6)  # three more looks: still one line for one repair
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        message = record.getMessage()
        assert message.startswith("1 repair(s) of svc since this receiver started are recorded under "
                                  "caretaker:repairs:svc")
        assert "this one keeps them under caretaker:db-1:" in message and "stop it, upgrade it, start it" in message
    finally:
        await earlier.client.aclose()


# --- 3. a receiver that gets other hosts' alerts says so -------------------------------------------

def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "receiver.admission"]


async def test_another_hosts_alerts_are_a_warning_and_their_hosts_are_in_the_audit_row(
        receiver_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A single host whose Prometheus labels it 127.0.0.1 (the address) while receiver.host
    is its name: it repairs nothing, and now says so, naming both."""
    caplog.set_level(logging.WARNING)
    config = config_for(tmp_path, {"svc": sleeper()}, host="web-1")
    client = await receiver_for(config)
    for i, host in enumerate(("127.0.0.1", "127.0.0.1", "10.0.0.7", "127.0.0.1")):
        resp = await client.post("/alerts", json=notification(alert(f"o{i}", service_name="svc",
                                                                    remediation="restart", host=host)), headers=AUTH)
        assert (await resp.json())["skipped"] == 1
    entries = await settle(client)
    assert pids(config, "svc") == []
    (first, second) = warnings(caplog)  # once per host value, not once per alert
    assert first.startswith("alert CaretakerServiceDown (o0) is about host '127.0.0.1', and this receiver repairs "
                            "host 'web-1' (receiver.host): not acting (other_host). If '127.0.0.1' is this host's "
                            "name in Prometheus's targets, set receiver.host to it")
    assert "'10.0.0.7'" in second and "More of these within 10 minutes are only counted" in second
    (row,) = entries
    assert (row["fingerprint"], row["reason"], row["times_seen"]) == ("~other_host", "other_host", 4)
    assert row["observation"] == {"receiver_host": "web-1", "fleet": False, "hosts": ["10.0.0.7", "127.0.0.1"]}


async def test_alerts_without_a_host_in_fleet_mode_are_a_warning(receiver_for: Any, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    client = await receiver_for(config_for(tmp_path, {"svc": sleeper()}, host="web-1", fleet=True))
    for i in range(3):
        await client.post("/alerts", json=notification(alert(f"n{i}", service_name="svc", remediation="restart")),
                          headers=AUTH)
    (row,) = await settle(client)
    (message,) = warnings(caplog)
    assert message.startswith("alert CaretakerServiceDown (n0) has no host label, and this receiver (receiver.host "
                              "'web-1') is in fleet mode (receiver.fleet), where every alert must name its host")
    assert (row["reason"], row["times_seen"]) == ("no_host", 3)
    assert row["observation"] == {"receiver_host": "web-1", "fleet": True, "hosts": []}


def test_the_warning_comes_again_after_its_interval_and_the_rows_hosts_are_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    from receiver.admission import HostSkips
    from receiver.payload import Alert

    caplog.set_level(logging.WARNING)
    now = [1000.0]
    skips = HostSkips("web-1", False, lambda: now[0], warn_every=600.0)

    def seen(host: str, hour: str = "h1") -> str:
        a = Alert.model_validate(alert("x", service_name="svc", host=host))
        return skips.observation(a, "other_host", ("~other_host", hour, "firing"))

    assert json.loads(seen("web-2"))["hosts"] == ["web-2"]
    assert seen("web-2") == "null"  # the row has it: nothing more to write
    now[0] += 599
    seen("web-2")
    assert len(warnings(caplog)) == 1
    now[0] += 2
    seen("web-2")
    assert len(warnings(caplog)) == 2
    for i in range(30):
        seen(f"h-{i}")
    assert seen("h-29") == "null"
    assert json.loads(seen("web-2", hour="h2"))["hosts"] == ["web-2"]  # a new hour, a new row


def test_a_rows_hosts_add_up_across_restarts_in_the_store(tmp_path: Path) -> None:
    """Each receiver run passes a host to a row once; the store keeps the union (and a
    resend without one keeps the row's)."""
    from receiver.store import NewAlert, Store

    store = Store(tmp_path / "state.sqlite")
    try:
        def admit(*hosts: str) -> None:
            observation = json.dumps({"receiver_host": "web-1", "fleet": False, "hosts": list(hosts)}) if hosts \
                else "null"
            store.admit([NewAlert("~other_host", "2026-12-02T14:00Z", "firing", "Down", "svc", "restart", "skipped",
                                  "other_host", "", observation)], 1.0)

        admit("b")
        admit()
        admit("a")
        admit(*(f"h{i:02d}" for i in range(30)))
        (entry,) = store.list()
        assert entry.times_seen == 4
        assert entry.observation["receiver_host"] == "web-1"
        hosts = entry.observation["hosts"]
        assert hosts[:2] == ["a", "b"] and len(hosts) == 20
    finally:
        store.close()


# --- 8. promtool's fleet cases catch a rule that stops matching on the host ------------------------

MUTANTS = {
    # Each drops the host from an `and`'s matching: prometheus/tests/caretaker-fleet-matching.test.yml
    # must fail with each. (The rest of the review's mutants, aggregations and other matches that
    # drop the host, fail caretaker-fleet.test.yml, which takes promtool 16 s a run: checked by hand.)
    "ProbeSlow": ("> 1 and caretaker_probe_success == 1",
                  "> 1 and on (service_name, probe) caretaker_probe_success == 1"),
    "FileStale, last and": ("caretaker_file_max_age_seconds and caretaker_file_exists == 1",
                            "caretaker_file_max_age_seconds and on (service_name, path) caretaker_file_exists == 1"),
    "FileStale, first and": ("caretaker_file_max_age_seconds > 0 and time()",
                             "caretaker_file_max_age_seconds > 0 and on (service_name, path) time()"),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_the_fleet_promtool_cases_fail_when_an_and_forgets_the_host(tmp_path: Path, name: str) -> None:
    promtool = require_binary("promtool")
    before, after = MUTANTS[name]
    tests = "caretaker-fleet-matching.test.yml"
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for path in (PROM / "rules").glob("*.yml"):
        (tmp_path / "rules" / path.name).write_text(path.read_text())
    (tmp_path / "tests" / tests).write_text((PROM / "tests" / tests).read_text())
    alerts = tmp_path / "rules" / "caretaker-alerts.yml"
    text = alerts.read_text()
    assert text.count(before) == 1, f"the mutant {name!r} no longer applies to caretaker-alerts.yml: update it"
    alerts.write_text(text.replace(before, after))
    assert run([promtool, "check", "rules", str(alerts)]).returncode == 0, "the mutant is a valid rule"
    unchanged = run([promtool, "test", "rules", tests], cwd=PROM / "tests")
    assert unchanged.returncode == 0, unchanged.stdout
    result = run([promtool, "test", "rules", tests], cwd=tmp_path / "tests")
    assert result.returncode != 0, f"promtool passes {tests} with the mutant {name!r}"
    # It fails because the alert fires for a host whose own right-hand side is false.
    got = next(line for line in result.stderr.splitlines() if line.strip().startswith("got:"))
    assert 'host="web-1"' in got or 'host="web-3"' in got, result.stderr


# --- 6. the host a target's address gives is one receiver.host takes ----------------------------

def test_the_host_from_an_address_is_a_name_receiver_host_takes_and_ipv6_needs_a_label(tmp_path: Path) -> None:
    from exporter.config import parse_config

    promtool = require_binary("promtool")
    config = yaml.safe_load((FLEET_DIR / "prometheus.yml").read_text())
    config["rule_files"] = []
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "exporters.yml").write_text(yaml.safe_dump([
        {"targets": ["db-1:8930", "db-2.example.com:8930", "10.0.0.13:8930", "web-9", "[2001:db8::1]:8930"]},
        {"targets": ["[2001:db8::2]:8930"], "labels": {"host": "db-3"}},
        {"targets": ["10.0.0.14:8930"], "labels": {"host": ""}},
    ]))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run([promtool, "check", "service-discovery", "--timeout=5s", str(tmp_path / "prometheus.yml"),
                  "caretaker-exporter"])
    assert result.returncode == 0, result.stderr
    hosts = {t["labels"]["instance"]: t["labels"].get("host") for t in json.loads(result.stdout)}
    assert hosts == {"db-1:8930": "db-1", "db-2.example.com:8930": "db-2.example.com", "10.0.0.13:8930": "10.0.0.13",
                     "web-9:80": "web-9", "[2001:db8::1]:8930": None, "[2001:db8::2]:8930": "db-3",
                     "10.0.0.14:8930": "10.0.0.14"}
    for host in filter(None, hosts.values()):  # each one a receiver can be
        assert parse_config({"receiver": {"host": host}, "services": {"a": {"match": {"comm": "x"}}}}).receiver.host \
            == host
