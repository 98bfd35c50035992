"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

No engine runs on the build machines, so: the compose file against the Compose
specification's JSON Schema, every file it mounts exists, and every port and URL in
it agrees with the configs it mounts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from exporter.config import load_config

from .helpers import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
RUNTIME = (".run",)
"""Host paths created at run time (by `make run`), not shipped."""


def flag(service: str, name: str) -> str:
    for arg in SERVICES[service]["command"]:
        if arg.startswith(f"--{name}="):
            return str(arg.split("=", 1)[1])
    raise AssertionError(f"{service} has no --{name}")


def compose_validator() -> jsonschema.Draft7Validator:
    # The spec says "$schema": "https://json-schema.org/draft-07/schema" (no "#"), which
    # jsonschema does not map to a draft by itself: name the draft.
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_follows_the_compose_specification() -> None:
    compose_validator().validate(COMPOSE)


def test_a_broken_compose_file_is_caught_by_the_schema() -> None:
    broken = {**COMPOSE, "services": {**SERVICES, "grafana": {**SERVICES["grafana"], "network_mode": 5}}}
    with pytest.raises(jsonschema.ValidationError):
        compose_validator().validate(broken)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_mounted_file_exists(service: str) -> None:
    for volume in SERVICES[service].get("volumes", []):
        source = volume.split(":", 1)[0]
        if not source.startswith("."):
            assert source in COMPOSE["volumes"], f"{service}: named volume {source} not declared"
            continue
        relative = Path(source).relative_to(".") if source != "." else Path(".")
        if relative.parts and relative.parts[0] in RUNTIME:
            continue
        assert (REPO / relative).exists(), f"{service} mounts {source}, which is not in the repository"


def test_everything_listens_on_loopback_on_the_host_network() -> None:
    for name, svc in SERVICES.items():
        assert svc.get("network_mode") == "host", name
        assert "ports" not in svc, f"{name} publishes ports; it should bind 127.0.0.1 on the host network"
    assert flag("prometheus", "web.listen-address").startswith("127.0.0.1:")
    assert flag("alertmanager", "web.listen-address").startswith("127.0.0.1:")
    assert SERVICES["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"


def test_ports_and_urls_agree_with_the_configs() -> None:
    prom = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    am = yaml.safe_load((REPO / "prometheus" / "alertmanager.yml").read_text())
    config = load_config(REPO / "caretaker.yml")
    datasource = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yml").read_text())
    prom_addr = flag("prometheus", "web.listen-address")
    am_addr = flag("alertmanager", "web.listen-address")
    assert datasource["datasources"][0]["url"] == f"http://{prom_addr}"
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [am_addr]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    assert targets["caretaker-exporter"] == [f"{config.exporter.listen_address}:{config.exporter.port}"]
    assert targets["caretaker-receiver"] == [f"{config.receiver.listen_address}:{config.receiver.port}"]
    hook = next(r for r in am["receivers"] if r["name"] == "caretaker")["webhook_configs"][0]
    assert hook["url"] == f"http://{config.receiver.listen_address}:{config.receiver.port}/alerts"
    assert SERVICES["exporter"]["environment"]["CARETAKER_HEALTH_URL"] == \
        f"http://127.0.0.1:{config.exporter.port}/-/healthy"
    assert SERVICES["receiver"]["environment"]["CARETAKER_HEALTH_URL"] == \
        f"http://127.0.0.1:{config.receiver.port}/-/healthy"
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.+)$", (REPO / "Dockerfile").read_text(), re.M)[0].split()}
    assert exposed == {config.exporter.port, config.receiver.port}


def test_mounted_paths_match_what_the_configs_expect() -> None:
    """Rules, the token and dashboards land where the mounted configs look for them."""
    prom_rules = next(v for v in SERVICES["prometheus"]["volumes"] if v.startswith("./prometheus/rules:"))
    assert prom_rules.split(":")[1] == "/etc/prometheus/rules"  # prometheus.yml: rule_files rules/*.yml
    am = yaml.safe_load((REPO / "prometheus" / "alertmanager.yml").read_text())
    hook = next(r for r in am["receivers"] if r["name"] == "caretaker")["webhook_configs"][0]
    token = hook["http_config"]["authorization"]["credentials_file"]
    secrets = next(v for v in SERVICES["alertmanager"]["volumes"] if v.startswith("./.run/secrets:"))
    assert f"/etc/alertmanager/{token}".startswith(secrets.split(":")[1] + "/")
    config = load_config(REPO / "caretaker.yml")
    assert config.receiver.bearer_token is not None and config.receiver.bearer_token.file is not None
    assert config.receiver.bearer_token.file.startswith(".run/secrets/")
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards/caretaker.yml").read_text())
    dashboards = next(v for v in SERVICES["grafana"]["volumes"] if v.startswith("./grafana/dashboards:"))
    assert dashboards.split(":")[1] == provider["providers"][0]["options"]["path"]


def test_dockerfile_runs_unprivileged_with_a_healthcheck() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.M)
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (REPO / copied).exists(), copied


def test_receiver_in_a_container_does_not_repair() -> None:
    """Started in a container, a service would run in the container, not on the host."""
    assert "--dry-run" in SERVICES["receiver"]["command"]
    assert SERVICES["exporter"]["pid"] == SERVICES["receiver"]["pid"] == "host"
