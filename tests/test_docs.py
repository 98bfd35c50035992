"""Docs must not drift: the configuration examples in README.md are valid; the generated
reference (docs/configuration.md) and JSON Schema (docs/caretaker.schema.json) are what
the models give; the schema accepts what the loader accepts and rejects what it rejects."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from exporter.config import ConfigError, json_schema, load_config, parse_config, schema_text
from exporter.config.docs import REFERENCE_FILE, REGENERATE, SCHEMA_FILE, reference_text, undocumented
from exporter.config.model import Config

from .helpers import REPO

BLOCKS = [b for b in re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
          if re.search(r"^(services|receiver|exporter):", b, re.M)]


def test_readme_has_config_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example-{i}" for i in range(len(BLOCKS))])
def test_readme_config_example_is_valid(block: str) -> None:
    data = yaml.safe_load(block)
    data.setdefault("services", {"example": {"match": {"comm": "x"}}})
    parse_config(data)


# --- the generated reference and schema ---------------------------------------------------

@pytest.mark.parametrize(("name", "generate"), [(REFERENCE_FILE, reference_text), (SCHEMA_FILE, schema_text)])
def test_generated_docs_are_current(name: str, generate: Any) -> None:
    checked_in = (REPO / "docs" / name).read_text(encoding="utf-8")
    assert checked_in == generate(), f"docs/{name} is stale: run {REGENERATE}"


def test_the_generator_command_finds_them_current() -> None:
    result = subprocess.run([sys.executable, "-m", "exporter.config.docs", "--check"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_the_generator_command_says_what_is_stale(tmp_path: Path) -> None:
    (tmp_path / REFERENCE_FILE).write_text("old\n")
    result = subprocess.run([sys.executable, "-m", "exporter.config.docs", "--check", "--docs-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert f"not current: {tmp_path / REFERENCE_FILE}, {tmp_path / SCHEMA_FILE}; run {REGENERATE}" in result.stderr
    assert (tmp_path / REFERENCE_FILE).read_text() == "old\n"  # --check writes nothing


def test_every_key_has_a_description_and_an_example() -> None:
    assert undocumented() == []


def test_the_reference_names_every_key() -> None:
    text = (REPO / "docs" / REFERENCE_FILE).read_text(encoding="utf-8")
    for name, model in [("services.<name>.start", "argv"), ("receiver", "state_reserve_bytes"),
                        ("services.<name>.processes", "max"), ("services.<name>.probes[]` (type: exec", "cwd")]:
        assert f"## `{name}" in text
        assert f"| `{model}` |" in text
    assert "| `max` | integer, ≥ 0 |  | min, or 1 when min is 0 |" in text
    assert "| `cooldown` | [duration](#duration), ≥ 0 | seconds | `1m` | `cooldown: 1m` |" in text


# --- the schema against the loader --------------------------------------------------------

VALIDATOR = jsonschema.Draft202012Validator(json_schema())


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema())
    assert json.loads((REPO / "docs" / SCHEMA_FILE).read_text()) == json_schema()


def test_the_example_config_names_the_schema_and_validates() -> None:
    text = (REPO / "caretaker.yml").read_text()
    assert text.splitlines()[0] == f"# yaml-language-server: $schema=docs/{SCHEMA_FILE}"
    assert (REPO / "docs" / SCHEMA_FILE).exists() and (REPO / "docs" / REFERENCE_FILE).exists()
    VALIDATOR.validate(yaml.safe_load(text))


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example-{i}" for i in range(len(BLOCKS))])
def test_readme_config_example_validates_against_the_schema(block: str) -> None:
    data = yaml.safe_load(block)
    data.setdefault("services", {"example": {"match": {"comm": "x"}}})
    VALIDATOR.validate(data)


def _examples() -> list[tuple[str, str, Any]]:
    out = []
    for model in _models(Config):
        for name, field in model.model_fields.items():
            for example in field.examples or ():
                out.append((model.__name__, name, example))
    return out


def _models(model: Any, seen: set[Any] | None = None) -> list[Any]:
    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    found = [model]
    for field in model.model_fields.values():
        for arg in _annotation_parts(field.annotation):
            if isinstance(arg, type) and hasattr(arg, "model_fields"):
                found += _models(arg, seen)
    return found


def _annotation_parts(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", ()) or ()
    meta = getattr(annotation, "__metadata__", None)
    parts = [annotation]
    if meta is not None:
        parts += _annotation_parts(annotation.__origin__)
    for arg in args:
        parts += _annotation_parts(arg)
    return parts


EXAMPLES = _examples()


@pytest.mark.parametrize(("model", "key", "example"), EXAMPLES, ids=[f"{m}.{k}" for m, k, _ in EXAMPLES])
def test_every_example_in_the_reference_fits_its_key(model: str, key: str, example: Any) -> None:
    schema = json_schema()
    VALIDATOR.evolve(schema={"$defs": schema["$defs"], **schema["$defs"][model]["properties"][key]}).validate(example)


def _config(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


BOTH_ACCEPT = [
    ("durations as text or numbers", """
     receiver: {cooldown: 1m30s, backup_interval: 2.5, problem_ttl: "13h", attempts: {window: 15m}}
     services:
       a: {match: {comm: x}, probes: [{name: p, type: tcp, port: 1, timeout: 250ms}], stop: {grace_period: 0}}
     """),
    ("signals by name, short name or number", """
     services:
       a: {match: {comm: x}, stop: {signal: 15}, remediation: {rotate_logs: {reopen_signal: hup}}}
       b: {match: {comm: y}, stop: {signal: SIGINT}, remediation: {allow: [signal], signal: {signal: USR1}}}
     """),
    ("processes with only min", """
     services:
       a: {match: {comm: x}, processes: {min: 3}}
     """),
    ("every probe type", """
     services:
       a:
         match: {port: 5432}
         probes:
           - {name: h, type: http, url: 'https://127.0.0.1/x', expect_status: [200, 204], insecure_skip_verify: true}
           - {name: t, type: tcp, port: 1, send: "PING\\r\\n", expect: PONG}
           - {name: r, type: redis, password: {env: REDIS_PASSWORD}, tls: true}
           - {name: p, type: postgres, tls: require, password: {file: pw}}
           - {name: e, type: exec, argv: [pg_isready], expect_exit: [0, 1]}
     """),
]

BOTH_REJECT = [
    ("an unknown key", "services:\n  a: {match: {comm: x}, colour: red}\n"),
    ("a negative duration", "services:\n  a: {match: {comm: x}, stop: {grace_period: -1s}}\n"),
    ("a zero duration where it must be positive", "services:\n  a: {match: {comm: x}, remediation: "
                                                  "{verify_timeout: 0s}}\n"),
    ("text that is not a duration", "receiver: {cooldown: soon}\nservices:\n  a: {match: {comm: x}}\n"),
    ("an unknown probe type", "services:\n  a: {match: {comm: x}, probes: [{name: p, type: smtp}]}\n"),
    ("a port out of range", "exporter: {port: 70000}\nservices:\n  a: {match: {comm: x}}\n"),
    ("no services", "exporter: {port: 8930}\n"),
    ("a service name with a space", "services:\n  my app: {match: {comm: x}}\n"),
    ("a secret inline", "receiver: {bearer_token: s3cret}\nservices:\n  a: {match: {comm: x}}\n"),
    ("an unknown action", "services:\n  a: {match: {comm: x}, remediation: {allow: [reboot]}}\n"),
]


@pytest.mark.parametrize(("case", "text"), BOTH_ACCEPT, ids=[c[0] for c in BOTH_ACCEPT])
def test_schema_and_loader_both_accept(tmp_path: Path, case: str, text: str) -> None:
    path = tmp_path / "caretaker.yml"
    path.write_text(_config(text))
    load_config(path)
    VALIDATOR.validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(("case", "text"), BOTH_REJECT, ids=[c[0] for c in BOTH_REJECT])
def test_schema_and_loader_both_reject(tmp_path: Path, case: str, text: str) -> None:
    path = tmp_path / "caretaker.yml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)
    assert not VALIDATOR.is_valid(yaml.safe_load(text))
