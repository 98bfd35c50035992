"""Configuration: valid files load; every invalid one names the place and exits 2;
``--check-config`` also looks up the programs the config runs and their directories."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exporter.config import ConfigError, load_config, machine_problems, parse_config, read_secret

from .helpers import REPO

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
    ("base_dir is not a key", VALID + "base_dir: /etc\n", "base_dir (line 12): unknown key"),
    ("two starts and settings for argv only",
     VALID.replace('start: {argv: [redis-server, --port, "6379"], log_file: logs/redis.log}',
                   "start: {systemd_unit: redis.service, supervisor: {program: redis}, umask: '027'}"),
     "services.redis.start (line 9): give exactly one of argv, systemd_unit, supervisor"),
    ("placeholder not declared",
     VALID.replace("allow: [restart]}", "allow: [restart, exec], exec: {argv: [flush, '{queue}', 'x{y}']}}"),
     "services.redis.remediation.exec (line 11): argv uses {queue} but labels does not declare 'queue'"),
    ("heartbeat named twice, at its place",
     VALID.replace("    remediation: {allow: [restart]}",
                   "    remediation: {allow: [restart]}\n    heartbeats: [{name: hb, timeout: 1s}]")
     + "  other:\n    match: {comm: x}\n    heartbeats: [{name: hb, timeout: 1s}]\n",
     "services.other.heartbeats[0].name (line 15): heartbeat 'hb' of other is also one of redis"),
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


def stub_program(directory: Path, name: str) -> Path:
    """An executable file ``directory/name`` (a program --check-config can find)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def env_with_path(directory: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.parametrize("program", ["exporter.app", "receiver.app"])
def test_check_config_mode(tmp_path: Path, program: str) -> None:
    stub_program(tmp_path / "bin", "redis-server")  # --check-config looks the start program up on PATH
    ok = subprocess.run([sys.executable, "-m", program, "--check-config", "--config", str(write(tmp_path, VALID))],
                        capture_output=True, text=True, timeout=30, cwd=REPO, env=env_with_path(tmp_path / "bin"))
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


MANY = [
    ("start: two ways, and argv-only settings",
     VALID.replace('start: {argv: [redis-server, --port, "6379"], log_file: logs/redis.log}',
                   "start: {systemd_unit: redis.service, supervisor: {program: redis}, umask: '027'}"),
     ["services.redis.start (line 9): give exactly one of argv, systemd_unit, supervisor",
      "services.redis.start (line 9): user, group, umask, limits, env and inherit_env are for argv"]),
    ("exec: two bad placeholders",
     VALID.replace("allow: [restart]}", "allow: [restart, exec], exec: {argv: [flush, '{queue}', 'x{y}']}}"),
     ["services.redis.remediation.exec (line 11): argv uses {queue} but labels does not declare 'queue'",
      "services.redis.remediation.exec (line 11): argv item 'x{y}': placeholders must be whole argv items"]),
    ("remediation: two blocks missing",
     VALID.replace("allow: [restart]", "allow: [vacuum, http]"),
     ["services.redis.remediation (line 11): allow has 'vacuum' but there is no remediation.vacuum block",
      "services.redis.remediation (line 11): allow has 'http' but there is no remediation.http block"]),
    ("service: three cross-field problems",
     VALID.replace('    start: {argv: [redis-server, --port, "6379"], log_file: logs/redis.log}\n', "")
     .replace("allow: [restart]", "allow: [restart, ensure_paths]")
     + "    files: [{path: a.json}, {path: a.json}]\n",
     ["services.redis (line 3): files lists a.json more than once",
      "services.redis (line 3): remediation.allow has 'restart' but the service has no 'start' command",
      "services.redis (line 3): remediation.allow has 'ensure_paths' but the service has no directories"]),
    ("probes: two names used twice",
     VALID.replace("name: web", "name: ping").replace("timeout: 1m30s}\n", "timeout: 1m30s}\n"
                                                     "      - {name: x, type: tcp, port: 2}\n"
                                                     "      - {name: x, type: tcp, port: 3}\n"),
     ["services.redis.probes (line 6): probe name 'ping' is used twice",
      "services.redis.probes (line 6): probe name 'x' is used twice"]),
    ("heartbeats: two names used twice",
     VALID + "    heartbeats: [{name: a, timeout: 1s}, {name: b, timeout: 1s}]\n"
     "  other:\n    match: {comm: x}\n    heartbeats: [{name: a, timeout: 1s}, {name: b, timeout: 1s}]\n",
     ["services.other.heartbeats[0].name (line 15): heartbeat 'a' of other is also one of redis",
      "services.other.heartbeats[1].name (line 15): heartbeat 'b' of other is also one of redis"]),
]


@pytest.mark.parametrize(("case", "text", "expected"), MANY, ids=[c[0] for c in MANY])
def test_every_cross_field_problem_is_reported(tmp_path: Path, case: str, text: str, expected: list[str]) -> None:
    """A section with several problems that involve several keys gets one line for each."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    for line in expected:
        assert any(p.startswith(line) for p in info.value.problems), (line, info.value.problems)
    assert len(info.value.problems) == len(expected), info.value.problems


PROCESSES = [
    ("{min: 3}", 3, 3),   # only min: exactly that many, no "max (1) is less than min (3)"
    ("{min: 2, max: 4}", 2, 4),
    ("{min: 0}", 0, 1),   # may be stopped, at most one
    ("{max: 5}", 1, 5),
    ("{max: 0}", 0, 0),   # must not run: no "max (0) is less than min (1)"
    ("{}", 1, 1),
]


@pytest.mark.parametrize(("written", "low", "high"), PROCESSES, ids=[c[0] for c in PROCESSES])
def test_an_unwritten_process_bound_follows_the_written_one(tmp_path: Path, written: str, low: int, high: int) -> None:
    config = load_config(write(tmp_path, VALID.replace("{min: 1, max: 2}", written)))
    processes = config.services["redis"].processes
    assert (processes.min, processes.max) == (low, high)


def test_the_config_directory_comes_through_the_validation_context(tmp_path: Path) -> None:
    """No ``base_dir`` key: the directory reaches the models as pydantic's validation
    context, and relative paths (pidfiles here) resolve against it."""
    from exporter.config import Config

    data = {"services": {"svc": {"match": {"pidfile": "run/svc.pid"}}}}
    config = Config.model_validate(data, context={"base_dir": tmp_path})
    assert "base_dir" not in Config.model_fields
    assert config.base_dir == tmp_path
    assert config.resolve("logs/a.log") == tmp_path / "logs" / "a.log"
    assert config.services["svc"].match.pidfile == str(tmp_path / "run" / "svc.pid")
    assert parse_config(data, base_dir=tmp_path).services["svc"].match.pidfile == str(tmp_path / "run" / "svc.pid")
    assert Config.model_validate(data).base_dir == Path.cwd()
    with pytest.raises(ConfigError, match=r"base_dir: unknown key"):
        parse_config({**data, "base_dir": "/"}, base_dir=tmp_path)


def test_yaml_anchors_and_merge_keys_keep_their_lines(tmp_path: Path) -> None:
    text = """
    services:
      a: &svc
        match: {comm: '^a(['}
      b:
        <<: *svc
        processes: {min: 1, colour: red}
    """
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [
        "services.a.match.comm (line 4): invalid regular expression '^a([': unterminated character set at position 3",
        "services.b.match.comm (line 4): invalid regular expression '^a([': unterminated character set at position 3",
        "services.b.processes.colour (line 7): unknown key"]


def test_a_file_that_is_not_utf8_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "caretaker.yml"
    path.write_bytes(b"services:\n  caf\xe9: {match: {comm: x}}\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


# --- what the config runs, looked up on this machine (--check-config) -------------------------

MISSING = "caretaker-no-such-program"
MACHINE = [
    # (case, the service's lines after "match", the problem --check-config reports, or None)
    ("a bare name on PATH", "start: {argv: [tool, -x]}", None),
    ("a bare name not on PATH", f"start: {{argv: [{MISSING}]}}",
     f"services.svc.start.argv[0] (line 4): program '{MISSING}' is not on the PATH it gets"),
    ("a path relative to the config's directory", "start: {argv: [bin/tool]}", None),
    ("a path relative to start.cwd", "start: {argv: [./run.sh], cwd: app}", None),
    ("start.cwd, not the config's directory, is where a relative path starts",
     "start: {argv: [bin/tool], cwd: app}", "services.svc.start.argv[0] (line 4): program {tmp}/app/bin/tool does "
                                            "not exist"),
    ("a file that is not executable", "start: {argv: [bin/notes.txt]}",
     "services.svc.start.argv[0] (line 4): program {tmp}/bin/notes.txt is not an executable file"),
    ("a directory", "start: {argv: [./app]}", "services.svc.start.argv[0] (line 4): program {tmp}/app is not an "
                                              "executable file"),
    ("start.cwd missing", "start:\n      argv: [tool]\n      cwd: nowhere",
     "services.svc.start.cwd (line 6): directory {tmp}/nowhere does not exist"),
    ("start.cwd a file", "start: {argv: [tool], cwd: bin/notes.txt}",
     "services.svc.start.cwd (line 4): {tmp}/bin/notes.txt is not a directory"),
    ("PATH from start.env", "start: {argv: [own-tool], env: {PATH: '{tmp}/own'}}", None),
    ("a program not on the PATH start.env sets", "start: {argv: [tool], env: {PATH: '{tmp}/own'}}",
     "services.svc.start.argv[0] (line 4): program 'tool' is not on the PATH it gets ({tmp}/own)"),
    ("an exec probe's program", "probes:\n      - {name: p, type: exec, argv: [./check.sh]}",
     "services.svc.probes[0].argv[0] (line 5): program {tmp}/check.sh does not exist"),
    ("an exec probe's cwd", "probes:\n      - {name: p, type: exec, argv: [tool], cwd: nowhere}",
     "services.svc.probes[0].cwd (line 5): directory {tmp}/nowhere does not exist"),
    ("the exec repair's program", f"remediation: {{allow: [exec], exec: {{argv: [{MISSING}]}}}}",
     f"services.svc.remediation.exec.argv[0] (line 4): program '{MISSING}' is not on the PATH it gets"),
    ("an exec repair whose program is an alert label",
     "remediation: {allow: [exec], exec: {argv: ['{prog}'], labels: {prog: 'a|b'}}}", None),
]


@pytest.fixture
def machine_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config directory with bin/tool, app/run.sh, own/own-tool (executables) and
    bin/notes.txt (not executable); bin/ is on PATH."""
    stub_program(tmp_path / "bin", "tool")
    stub_program(tmp_path / "app", "run.sh")
    stub_program(tmp_path / "own", "own-tool")
    (tmp_path / "bin" / "notes.txt").write_text("not a program\n")
    assert not (tmp_path / "bin" / "notes.txt").stat().st_mode & stat.S_IXUSR
    monkeypatch.setenv("PATH", env_with_path(tmp_path / "bin")["PATH"])
    return tmp_path


def machine_config(directory: Path, lines: str) -> Path:
    text = "services:\n  svc:\n    match: {comm: x}\n    " + lines + "\n"
    path = directory / "caretaker.yml"
    path.write_text(text.replace("{tmp}", str(directory)))
    return path


@pytest.mark.parametrize(("case", "lines", "expected"), MACHINE, ids=[c[0] for c in MACHINE])
def test_check_config_looks_up_what_the_config_runs(machine_dir: Path, case: str, lines: str,
                                                      expected: str | None) -> None:
    path = machine_config(machine_dir, lines)
    config = load_config(path)  # never a load error: the program may be installed later
    warnings = machine_problems(config)
    if expected is None:
        load_config(path, machine=True)
        assert warnings == []
        return
    expected = expected.replace("{tmp}", str(machine_dir))
    with pytest.raises(ConfigError) as info:
        load_config(path, machine=True)
    assert info.value.problems == warnings  # the same problems, as errors in check mode
    assert len(warnings) == 1 and warnings[0].startswith(expected), warnings


def cli(program: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", program, *args], capture_output=True, text=True, timeout=30,
                          cwd=REPO, env=env)


@pytest.mark.parametrize("program", ["exporter.app", "receiver.app"])
def test_check_config_shows_every_problem_with_its_line(tmp_path: Path, program: str) -> None:
    text = """
    services:
      web:
        match: {comm: '^web$'}
        processes: {min: 3}
        start: {argv: [caretaker-no-such-program, --port, "8000"]}
        remediation: {allow: [restart, free_port, rotate_logs]}
      worker:
        match: {cmdline: 'worker\\.py'}
        probes: [{name: alive, type: tcp, port: 9, timeout: -1s}]
        start: {argv: [python3, worker.py], cwd: /nonexistent/caretaker}
    """
    result = cli(program, "--check-config", "--config", str(write(tmp_path, text)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[1:] == [
        "  services.web (line 3): remediation.allow has 'free_port' but the service has no ports and a start command",
        "  services.web (line 3): remediation.allow has 'rotate_logs' but the service has no logs or start.log_file",
        "  services.web.start.argv[0] (line 6): program 'caretaker-no-such-program' is not on the PATH it gets "
        f"({os.environ['PATH']})",
        "  services.worker.probes[0].timeout (line 10): Input should be greater than 0",
    ], result.stderr


def test_a_missing_program_is_a_warning_when_the_program_starts(tmp_path: Path) -> None:
    """The program may be on a volume not mounted yet: the exporter (and the receiver)
    start, and say what they did not find."""
    path = write(tmp_path, "services:\n  web:\n    match: {comm: '^caretaker-nothing$'}\n"
                           "    start: {argv: [caretaker-no-such-program]}\n")
    result = cli("exporter.app", "--once", "--config", str(path))
    assert result.returncode == 1, result.stderr  # ran, and found the service down
    assert f"{path}: warning: services.web.start.argv[0] (line 4): program 'caretaker-no-such-program' is not " \
           "on the PATH" in result.stderr
    assert "web" in result.stdout


@pytest.mark.parametrize("program", ["exporter.app", "receiver.app"])
def test_print_schema_prints_the_checked_in_schema(program: str) -> None:
    result = cli(program, "--print-schema")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (REPO / "docs" / "caretaker.schema.json").read_text(encoding="utf-8")
