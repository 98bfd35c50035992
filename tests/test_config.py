"""Configuration: valid files load; every invalid one names the place and exits 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exporter.config import ConfigError, load_config, read_secret

from .conftest import REPO

VALID = """
services:
  redis:
    match: {comm: '^redis-server$', cmdline: ':6379'}
    processes: {min: 1, max: 2}
    probes:
      - {name: ping, type: tcp, port: 6379, timeout: 500ms}
      - {name: web, type: http, url: 'http://127.0.0.1:8000/health', expect_status: [200, 204], timeout: 1m30s}
    start: {argv: [redis-server, --port, "6379"], log_file: logs/redis.log}
    stop: {signal: INT, grace_period: 2.5}
    remediation: {allow: [restart]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "caretaker.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_config_loads_with_units_and_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    redis = config.services["redis"]
    assert redis.probes[0].timeout == 0.5
    assert redis.probes[1].timeout == 90.0
    assert redis.stop.signal == "SIGINT"
    assert redis.stop.grace_period == 2.5
    assert config.exporter.port == 8930 and config.receiver.port == 8931
    assert config.exporter.listen_address == config.receiver.listen_address == "127.0.0.1"
    assert config.resolve("logs/redis.log") == tmp_path / "logs" / "redis.log"
    assert config.weights_for("redis").processes == 30


def test_shipped_example_config_is_valid() -> None:
    config = load_config(REPO / "caretaker.yml")
    assert set(config.services) == {"redis", "webapp"}


INVALID = [
    ("unknown key", VALID.replace("processes: {min: 1, max: 2}", "processes: {min: 1, max: 2, maximum: 3}"),
     "services.redis.processes.maximum (line 5): unknown key"),
    ("bad regex", VALID.replace("'^redis-server$'", "'^redis(['"),
     "services.redis.match.comm (line 4): invalid regular expression"),
    ("negative duration", VALID.replace("timeout: 500ms", "timeout: -2s"),
     "services.redis.probes[0].timeout (line 7): Input should be greater than 0"),
    ("negative grace", VALID.replace("grace_period: 2.5", "grace_period: -1"),
     "services.redis.stop.grace_period (line 10): Input should be greater than or equal to 0"),
    ("not a duration", VALID.replace("timeout: 500ms", "timeout: soon"),
     "services.redis.probes[0].timeout (line 7): 'soon' is not a duration"),
    ("restart without start",
     VALID.replace('    start: {argv: [redis-server, --port, "6379"], log_file: logs/redis.log}\n', ""),
     "services.redis (line 3): remediation.allow has 'restart' but the service has no 'start' command"),
    ("max below min", VALID.replace("{min: 1, max: 2}", "{min: 3, max: 2}"),
     "services.redis.processes (line 5): max (2) is less than min (3)"),
    ("unknown action", VALID.replace("allow: [restart]", "allow: [reboot]"),
     "services.redis.remediation.allow[0] (line 11): Input should be 'restart'"),
    ("unknown probe type", VALID.replace("type: tcp", "type: smtp"),
     "services.redis.probes[0] (line 7): Input tag 'smtp' found using 'type' does not match"),
    ("bad signal", VALID.replace("signal: INT", "signal: SIGFOO"),
     "services.redis.stop.signal (line 10): 'SIGFOO' is not a signal name"),
    ("empty match", VALID.replace("match: {comm: '^redis-server$', cmdline: ':6379'}", "match: {}"),
     "services.redis.match (line 4): give at least one of comm, exe, cmdline, pidfile, port"),
    ("duplicate probe names", VALID.replace("name: web", "name: ping"),
     "services.redis.probes (line 6): probe name 'ping' is used twice"),
    ("duplicate file path",
     VALID.replace("    remediation: {allow: [restart]}",
                   "    remediation: {allow: [restart]}\n    files: [{path: a.json}, {path: a.json}]"),
     "services.redis (line 3): files lists a.json more than once"),
    ("duplicate heartbeat",
     VALID.replace("    remediation: {allow: [restart]}",
                   "    remediation: {allow: [restart]}\n    heartbeats: [{name: hb, timeout: 1s}]")
     + "  other:\n    match: {comm: x}\n    heartbeats: [{name: hb, timeout: 1s}]\n",
     "heartbeat 'hb' of other is also one of redis"),
    ("no services", "exporter: {port: 8930}\n", "services (line 1): required key is missing"),
    ("port out of range", VALID + "exporter: {port: 70000}\n",
     "exporter.port (line 12): Input should be less than or equal to 65535"),
    ("not a mapping", "- just\n- a list\n", "(top level): expected a mapping"),
    ("bad yaml", "services:\n  redis: [unclosed\n", "line 3, column 1: not valid YAML"),
]


@pytest.mark.parametrize(("case", "text", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_config_names_the_place(tmp_path: Path, case: str, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = VALID.replace("timeout: 500ms", "timeout: -1s").replace("max: 2}", "max: 2, colour: red}")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert len(info.value.problems) == 2


@pytest.mark.parametrize("program", ["exporter.app", "receiver.app"])
def test_cli_exits_2_and_starts_nothing_on_bad_config(tmp_path: Path, program: str) -> None:
    path = write(tmp_path, VALID.replace("processes: {min: 1, max: 2}", "processes: {min: 1, max: 2, x: 1}"))
    result = subprocess.run([sys.executable, "-m", program, "--config", str(path)], capture_output=True,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2
    assert "services.redis.processes.x (line 5): unknown key" in result.stderr
    assert "listening" not in result.stderr


@pytest.mark.parametrize("program", ["exporter.app", "receiver.app"])
def test_check_config_mode(tmp_path: Path, program: str) -> None:
    ok = subprocess.run([sys.executable, "-m", program, "--check-config", "--config", str(write(tmp_path, VALID))],
                        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "valid (1 services: redis)" in ok.stdout
    missing = subprocess.run([sys.executable, "-m", program, "--check-config", "--config", str(tmp_path / "no.yml")],
                             capture_output=True, text=True, timeout=30, cwd=REPO)
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_secret_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(write(tmp_path, VALID + "receiver:\n  bearer_token: {file: token}\n"))
    (tmp_path / "token").write_text("s3cret\n")
    assert config.receiver.bearer_token is not None
    assert read_secret(config.receiver.bearer_token, config.base_dir) == "s3cret"
    monkeypatch.setenv("CT_TOKEN", "from-env")
    config = load_config(write(tmp_path, VALID + "receiver:\n  bearer_token: {env: CT_TOKEN}\n"))
    assert config.receiver.bearer_token is not None
    assert read_secret(config.receiver.bearer_token, config.base_dir) == "from-env"
    monkeypatch.delenv("CT_TOKEN")
    with pytest.raises(ConfigError, match="empty or missing"):
        read_secret(config.receiver.bearer_token, config.base_dir)
