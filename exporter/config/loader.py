"""Loading: a file (or parsed data) to a valid :class:`~.model.Config`, or a
:class:`~.errors.ConfigError` listing every problem with its place in the file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigError, Lines, describe
from .model import Config
from .yaml_marks import parse_yaml

__all__ = ["load_config", "parse_config"]


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def parse_config(data: Any, source: str = "config", lines: Lines | None = None,
                 base_dir: Path | None = None, machine: bool = False) -> Config:
    """Validate already-parsed YAML data; relative paths resolve against ``base_dir``
    (default: the working directory). With ``machine``, the programs the config runs and
    their working directories are looked up too (see machine.py). Raises ``ConfigError``
    listing every problem."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with a 'services' key"])
    context = {"base_dir": base_dir or Path.cwd(), "lines": lines, "machine": machine}
    try:
        return Config.model_validate(data, context=context)
    except ValidationError as err:
        problems = [f"{describe(tuple(e['loc']), lines)}: {_message(e)}" for e in err.errors()]
        raise ConfigError(source, problems) from err


def load_config(path: str | os.PathLike[str], machine: bool = False) -> Config:
    """Read and validate ``path`` (with ``machine``: and look up what it runs, as
    ``--check-config`` does). Raises ``ConfigError`` (never a bare exception)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(str(p), [f"cannot read: {err.strerror}"]) from err
    except UnicodeDecodeError as err:
        raise ConfigError(str(p), [f"not UTF-8 text: {err.reason} at byte {err.start}"]) from err
    try:
        data, lines = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(p), [f"{where}not valid YAML: {getattr(err, 'problem', err)}"]) from err
    return parse_config(data, source=str(p), lines=lines, base_dir=p.resolve().parent, machine=machine)
