"""Units, reusable field types and the base model of the configuration.

Durations are Prometheus-style strings (``500ms``, ``10s``, ``1m30s``, ``1h``, ``2d``)
or plain numbers of seconds, and become ``float`` seconds; sizes are integers of bytes.
Each reusable type carries a :class:`Doc` marker (its name and unit in the generated
reference, docs/configuration.md) and a JSON Schema that accepts what its validator
accepts (a ``BeforeValidator`` alone would make the schema say "number" for a duration).

:class:`Model` is the base of every section: unknown keys are errors, the result is
frozen, attribute docstrings become descriptions (reference and schema), and its
cross-field checks (:meth:`Model.cross_check`) report every problem, not the first.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "PROBE_TYPES",
    "REMEDIATION_ACTIONS",
    "Action",
    "Bytes",
    "Doc",
    "DocDefault",
    "EnvName",
    "FilePath",
    "ListenConfig",
    "Model",
    "Name",
    "Port",
    "PositiveSeconds",
    "ProbeType",
    "Problem",
    "Regex",
    "Seconds",
    "SignalName",
    "base_dir_from",
    "parse_duration",
    "problems_error",
    "resolve_path",
]

Action = Literal["restart", "stop_duplicates", "free_port", "rotate_logs", "clean", "ensure_paths", "restore_file",
                 "vacuum", "http", "exec", "signal", "release_claims"]
REMEDIATION_ACTIONS: tuple[str, ...] = get_args(Action)
"""Repairs the receiver knows. A service may allow only these."""
ProbeType = Literal["http", "tcp", "redis", "postgres", "exec"]
PROBE_TYPES: tuple[str, ...] = get_args(ProbeType)
"""The ``type`` tags of probes (pydantic puts the tag in an error's location)."""


@dataclass(frozen=True)
class Doc:
    """How the reference names a type (``duration``) and its unit (``seconds``).

    An ``Annotated`` marker: pydantic keeps it in the field's metadata and ignores it.
    """

    name: str
    unit: str = ""
    complete: bool = False
    """The name says all its limits (a port is 1-65535): the reference shows no others."""


@dataclass(frozen=True)
class DocDefault:
    """``json_schema_extra`` of a key whose default depends on other keys: the schema and
    the reference show ``text`` instead of the placeholder default."""

    text: str

    def __call__(self, schema: dict[str, Any]) -> None:
        schema.pop("default", None)
        schema["x-default"] = self.text


_DURATION = r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+"
_DURATION_RE = re.compile(rf"^{_DURATION}$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> Any:
    """Turn ``"1m30s"``, ``"250ms"`` or a number into seconds (float).

    Negative values are left for the ``ge=0`` constraint to reject with a clear
    message; anything that is not a duration raises ``ValueError``.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 500ms or 1m30s")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            return -1.0 * float(parse_duration(text[1:]))
        if _DURATION_RE.fullmatch(text):
            return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))
    raise ValueError(f"{value!r} is not a duration (use e.g. 10s, 500ms, 1m30s, or seconds)")


def _duration_schema(positive: bool) -> WithJsonSchema:
    # A string must hold a non-zero digit when the duration must be positive ("0s" is not).
    nonzero = "(?=[^1-9]*[1-9])" if positive else ""
    number: dict[str, Any] = {"type": "number", "exclusiveMinimum" if positive else "minimum": 0}
    return WithJsonSchema({"anyOf": [number, {"type": "string", "pattern": rf"^\s*{nonzero}{_DURATION}\s*$"}]})


def _check_regex(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected a regular expression string")
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"invalid regular expression {value!r}: {err}") from err
    return value


def _parse_signal(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value).name
        except ValueError as err:
            raise ValueError(f"{value} is not a signal number") from err
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in signal.Signals.__members__:
            return name
    raise ValueError(f"{value!r} is not a signal name (e.g. SIGTERM, SIGINT, SIGHUP)")


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0), _duration_schema(positive=False),
                    Doc("duration", "seconds")]
"""A duration of zero or more seconds."""
PositiveSeconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0), _duration_schema(positive=True),
                            Doc("duration", "seconds")]
"""A duration of more than zero seconds."""
Regex = Annotated[str, BeforeValidator(_check_regex), Doc("regex")]
"""A Python regular expression (``re``), searched unless the key says otherwise."""
SignalName = Annotated[str, BeforeValidator(_parse_signal),
                       WithJsonSchema({"anyOf": [{"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9+]*$"},
                                                 {"type": "integer", "minimum": 1}]}),
                       Doc("signal")]
"""A signal name (``SIGTERM``, ``TERM``, ``term``) or number; stored as ``SIGTERM``."""
Name = Annotated[str, Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_.-]*$", max_length=100), Doc("name", complete=True)]
"""Letters, digits, ``_``, ``.``, ``-``; not starting with a digit, ``.`` or ``-``."""
Port = Annotated[int, Field(ge=1, le=65535), Doc("port", complete=True)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200),
                   Doc("variable name", complete=True)]
Bytes = Annotated[int, Doc("integer", "bytes")]
"""A size in bytes (a plain integer)."""
FilePath = Annotated[str, Doc("path")]
"""A path; a relative one is relative to the config file's directory, ``~`` is expanded."""


def base_dir_from(context: Any) -> Path:
    """The config file's directory from pydantic's validation context
    (``model_validate(data, context={"base_dir": ...})``); the working directory without one."""
    if isinstance(context, Mapping) and context.get("base_dir") is not None:
        return Path(context["base_dir"])
    return Path.cwd()


def resolve_path(base_dir: Path, path: str) -> Path:
    """``path`` (``~`` expanded) made absolute against ``base_dir``."""
    return (base_dir / os.path.expanduser(path)).resolve()


Problem = str | tuple[tuple[str | int, ...], str]
"""A message, or ``(location below the model, message)``."""


def problems_error(title: str, problems: Iterable[Problem], value: Any) -> ValidationError:
    """One validation error per problem, at the place being validated or below it: raised
    from a validator, pydantic reports each of them (a ``ValueError`` reports one)."""
    details = []
    for problem in problems:
        loc, message = ((), problem) if isinstance(problem, str) else problem
        details.append(InitErrorDetails(type=PydanticCustomError("value_error", "{problem}", {"problem": message}),
                                        loc=loc, input=value))
    return ValidationError.from_exception_data(title, details)


class Model(BaseModel):
    """Base of every section: unknown keys are errors, the result is frozen, and the
    docstring under each field is its description (reference, JSON Schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    def cross_check(self) -> Iterator[Problem]:
        """Problems that involve several keys of this section: a message (about the
        section) or ``(location, message)``. Runs once the keys themselves are valid;
        every problem is reported."""
        return iter(())

    def machine_check(self, base_dir: Path) -> Iterable[Problem]:
        """Problems of this section on this machine (a program that is not there, a
        working directory that does not exist), wanted only when the validation context
        says ``{"machine": True}`` (``--check-config``; see machine.py)."""
        return ()

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo) -> Self:
        problems = list(self.cross_check())
        if isinstance(info.context, Mapping) and info.context.get("machine"):
            problems += self.machine_check(base_dir_from(info.context))
        if problems:
            raise problems_error(type(self).__name__, problems, self)
        return self


class ListenConfig(Model):
    """Where a program listens (base of ``exporter`` and ``receiver``)."""

    listen_address: str = "127.0.0.1"
    """Address to bind. The receiver refuses one beyond loopback without ``bearer_token`` or
    ``basic_auth``."""
