"""Write docs/configuration.md and docs/caretaker.schema.json from the models.

    python -m exporter.config.docs            # (make docs) writes both files under docs/
    python -m exporter.config.docs --check    # exit 1 if either is not what it would write

The reference has a section per block of the file (``exporter``, ``receiver``,
``services.<name>.probes[]`` per ``type``...), and a row per key: its type, unit,
default, an example and its description, the field's docstring. A key's example is
its field's ``examples`` or, failing that, its default; :func:`undocumented` names the
keys that lack a description or an example (a test keeps that list empty).
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .model import Config
from .schema import plain_text, schema_text
from .secrets import Secret
from .types import Doc, DocDefault

__all__ = ["REFERENCE_FILE", "SCHEMA_FILE", "main", "reference_text", "undocumented"]

REFERENCE_FILE = "configuration.md"
SCHEMA_FILE = "caretaker.schema.json"
REGENERATE = "python -m exporter.config.docs (make docs)"

VALUE_TYPES = {
    "duration": "A Prometheus-style duration: `500ms`, `10s`, `1m30s`, `2h`, `7d` (units `ms`, `s`, `m`, `h`, "
                "`d`, combined largest first), or a number of seconds (`2.5`). Negative durations are errors.",
    "integer": "A whole number; with a unit of bytes, a plain number of bytes (`4194304`, not `4MiB`).",
    "signal": "A signal name, with or without `SIG`, any case (`SIGTERM`, `TERM`, `hup`), or its number (`15`).",
    "regex": "A Python regular expression (`re`), searched anywhere in the text unless the key says otherwise "
             "(anchor it with `^...$`). Quote it in YAML when it holds `:`, `#`, `{`, `[` or starts with `*`.",
    "name": "Letters, digits, `_`, `.` and `-`, starting with a letter or `_`; at most 100 characters.",
    "path": "A file or directory; a relative path is relative to the config file's directory, and `~` is the "
            "home directory.",
    "port": "A TCP port, 1 to 65535.",
    "variable name": "An environment variable name: letters, digits and `_`, not starting with a digit.",
    "secret": "Never the value itself: `{file: PATH}` (the file's content, stripped; PATH relative to the config "
              "file) or `{env: NAME}` (an environment variable of the program that reads it), exactly one.",
}


@dataclass(frozen=True)
class _Section:
    path: str
    """The key path as the heading shows it: ``services.<name>.probes[]``."""
    model: type[BaseModel]
    note: str = ""
    """What tells this section apart (``type: http``)."""

    @property
    def anchor(self) -> str:
        text = f"{self.path} {self.note}".lower()
        return "-".join("".join(c if c.isalnum() else " " for c in text).split())


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)):
            return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 - built at run time
    return annotation


def _models_in(annotation: Any) -> Iterator[tuple[str, type[BaseModel]]]:
    """``(path suffix, model)`` for each model a field holds: ``""`` for a single one,
    ``"[]"`` for a list, ``".<name>"`` for a mapping."""
    annotation = _strip_optional(annotation)
    origin = get_origin(annotation)
    if origin is Annotated:
        yield from _models_in(get_args(annotation)[0])
    elif origin is tuple:
        for suffix, model in _models_in(get_args(annotation)[0]):
            yield "[]" + suffix, model
    elif origin is dict:
        for suffix, model in _models_in(get_args(annotation)[1]):
            yield ".<name>" + suffix, model
    elif origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            yield from _models_in(arg)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not Secret:
        yield "", annotation


def _sections(model: type[BaseModel], path: str, note: str = "") -> Iterator[_Section]:
    yield _Section(path, model, note)
    for name, field in model.model_fields.items():
        found = list(_models_in(field.annotation))
        for suffix, sub in found:
            sub_note = ""
            if len(found) > 1 and "type" in sub.model_fields:  # a union told apart by its type key
                sub_note = "type: " + " ".join(get_args(sub.model_fields["type"].annotation))
            yield from _sections(sub, f"{path}.{name}{suffix}" if path else f"{name}{suffix}", sub_note)


def _all_sections() -> list[_Section]:
    """Every block of the file; a model met again (``health_weights`` of a service) links
    to its first section rather than repeating it."""
    seen: dict[type[BaseModel], _Section] = {}
    out = []
    for section in _sections(Config, ""):
        if section.model in seen:
            continue
        seen[section.model] = section
        out.append(section)
    return out


def _constraints(items: list[Any]) -> str:
    words = []
    for m in items:
        if isinstance(m, FieldInfo):
            words.append(_constraints(list(m.metadata)))
        elif isinstance(m, annotated_types.Ge):
            words.append(f"≥ {m.ge}")
        elif isinstance(m, annotated_types.Gt):
            words.append(f"> {m.gt}")
        elif isinstance(m, annotated_types.Le):
            words.append(f"≤ {m.le}")
        elif isinstance(m, annotated_types.Lt):
            words.append(f"< {m.lt}")
        elif isinstance(m, annotated_types.MinLen) and m.min_length:
            words.append(f"at least {m.min_length}")
        elif isinstance(m, annotated_types.MaxLen) and m.max_length and m.max_length < 100:
            words.append(f"at most {m.max_length} long")
        elif getattr(m, "pattern", None):
            words.append(f"matching `{m.pattern}`")
    return ", ".join(w for w in words if w)


def _doc_of(field: FieldInfo) -> Doc | None:
    """The :class:`Doc` marker of a field's type (of its items, for a list or mapping)."""
    return next((m for m in field.metadata if isinstance(m, Doc)), None) or _doc_in(field.annotation)


def _doc_in(annotation: Any) -> Doc | None:
    annotation = _strip_optional(annotation)
    if get_origin(annotation) is Annotated:
        for m in get_args(annotation)[1:]:
            if isinstance(m, Doc):
                return m
        return _doc_in(get_args(annotation)[0])
    if get_origin(annotation) in (tuple, dict):
        return _doc_in(get_args(annotation)[-1] if get_origin(annotation) is dict else get_args(annotation)[0])
    return None


class _Renderer:
    def __init__(self, sections: list[_Section]) -> None:
        self.by_model = {s.model: s for s in sections}
        self.sections = sections

    def link(self, model: type[BaseModel]) -> str:
        if model is Secret:
            return "[secret](#secret)"
        section = self.by_model[model]
        return f"[`{section.path}`](#{section.anchor})"

    def type_text(self, annotation: Any, metadata: tuple[Any, ...] = ()) -> str:
        """Markdown for a type: ``[duration](#duration), > 0``, ``list of string``..."""
        annotation = _strip_optional(annotation)
        origin = get_origin(annotation)
        if origin is Annotated:
            base, *meta = get_args(annotation)
            return self.type_text(base, (*meta, *metadata))
        doc = next((m for m in metadata if isinstance(m, Doc)), None)
        if doc is not None:
            text = "integer" if doc.name == "integer" else f"[{doc.name}](#{doc.name.replace(' ', '-')})"
            extra = "" if doc.complete else _constraints([m for m in metadata if not isinstance(m, Doc)])
            return text + (f", {extra}" if extra else "")
        limits = _constraints(list(metadata))
        if origin is Literal:
            values = get_args(annotation)
            text = f"`{values[0]}`" if len(values) == 1 else "one of " + ", ".join(f"`{a}`" for a in values)
        elif origin is tuple:
            text = "list of " + self.type_text(get_args(annotation)[0])
        elif origin is dict:
            key, value = get_args(annotation)
            text = f"mapping of {self.type_text(key)} to {self.type_text(value)}"
        elif origin in (Union, types.UnionType):
            variants = [self.type_text(a) for a in get_args(annotation)]
            models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(models) > 2:  # the probes, told apart by their type
                return "probe: " + ", ".join(f"[{self.by_model[m].note.removeprefix('type: ')}]"
                                             f"(#{self.by_model[m].anchor})" for m in models)
            text = " or ".join(variants)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            text = self.link(annotation)
        else:
            text = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(annotation, str(annotation))
        return text + (f", {limits}" if limits else "")

    def field_row(self, key: str, field: FieldInfo) -> str:
        doc = _doc_of(field)
        unit = doc.unit if doc is not None else ""
        cells = [f"`{key}`", self.type_text(field.annotation, tuple(field.metadata)), unit,
                 _default_text(field, unit), _example_text(key, field, unit),
                 plain_text(field.description or "").replace("\n\n", "<br><br>")]
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    def section(self, section: _Section) -> list[str]:
        title = f"`{section.path}`" + (f" ({section.note})" if section.note else "") if section.path else "Top level"
        out = [f'<a id="{section.anchor or "top-level"}"></a>', "", f"## {title}", ""]
        if section.model.__doc__ and section.model is not Config:
            out += [plain_text(section.model.__doc__), ""]
        out += ["| Key | Type | Unit | Default | Example | Description |", "|---|---|---|---|---|---|"]
        for name, field in section.model.model_fields.items():
            out.append(self.field_row(name, field))
        for name, field in section.model.model_fields.items():  # a block documented at another path
            here = f"{section.path}.{name}".lstrip(".")
            for suffix, model in _models_in(field.annotation):
                home = self.by_model.get(model)
                if home is not None and home.path != here + suffix:
                    out += ["", f"`{here}{suffix}` has the keys of {self.link(model)}."]
        return [*out, ""]


def _human_seconds(value: float) -> str:
    """``900.0`` as ``15m``; ``0.25`` as ``250ms`` (what a person would write)."""
    if value == 0:
        return "0s"
    if value < 1:
        return f"{value * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and math.isclose(value % size, 0, abs_tol=1e-9):
            return f"{value / size:g}{unit}"
    return f"{value:g}s"


def _yaml_value(value: Any, unit: str = "") -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if unit == "seconds" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _human_seconds(float(value))
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _default_value(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _default_text(field: FieldInfo, unit: str) -> str:
    if isinstance(field.json_schema_extra, DocDefault):
        return plain_text(field.json_schema_extra.text)
    if field.is_required():
        return "**required**"
    value = _default_value(field)
    if value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "its keys' defaults"
    text = _yaml_value(value, unit)
    if unit == "bytes" and isinstance(value, int) and value >= 1024:
        size: float = value
        suffix = ""
        for suffix in ("KiB", "MiB", "GiB"):  # noqa: B007 - the last one is kept
            size /= 1024
            if size < 1024:
                break
        return f"`{text}` ({size:g} {suffix})"
    return f"`{text}`"


def _example(field: FieldInfo) -> Any:
    """The key's example: its field's ``examples``, or a default that says something."""
    if field.examples:
        return field.examples[0]
    literal = get_args(_strip_optional(field.annotation)) if get_origin(field.annotation) is Literal else ()
    if len(literal) == 1:  # a tag such as a probe's type
        return literal[0]
    value = None if field.is_required() else _default_value(field)
    if value is None or value in ((), {}, "") or isinstance(value, BaseModel):
        return None
    return value


def _example_text(key: str, field: FieldInfo, unit: str) -> str:
    if list(_models_in(field.annotation)) and not field.examples:
        return "see its section"
    value = _example(field)
    return "" if value is None else f"`{key}: {_yaml_value(value, unit)}`"


def undocumented() -> list[str]:
    """Keys without a description, or (for a key that is not a block) without an example."""
    out = []
    for section in _all_sections():
        for name, field in section.model.model_fields.items():
            where = f"{section.path}.{name}".lstrip(".")
            if not field.description:
                out.append(f"{where}: no docstring")
            if not list(_models_in(field.annotation)) and _example(field) is None:
                out.append(f"{where}: no example (Field(examples=[...]) or a default)")
    return out


def reference_text() -> str:
    """docs/configuration.md as the generator writes it."""
    sections = _all_sections()
    r = _Renderer(sections)
    out = [
        "# caretaker configuration reference",
        "",
        f"<!-- Generated from the models in exporter/config/ by `{REGENERATE}`. Do not edit by hand: edit the",
        "     docstrings and examples there and regenerate; tests/test_docs.py fails when this file is stale. -->",
        "",
        "Both programs read one YAML file, `caretaker.yml` ([the example](../caretaker.yml) is what `make run`",
        "uses). It is validated strictly: an unknown key is an error, every error names its place",
        "(`services.redis.probes[0].timeout (line 14): ...`), and the program exits with status 2 and starts",
        "nothing. `caretaker-exporter --check-config --config FILE` (or `caretaker-receiver --check-config`)",
        "validates a file and also looks up, on this machine, the programs it runs and their working",
        "directories. Relative paths are relative to the config file's directory.",
        "",
        f"Editors: [`{SCHEMA_FILE}`]({SCHEMA_FILE}) is the JSON Schema of the file (also printed by",
        "`caretaker-exporter --print-schema`). With the YAML language server (VS Code's YAML extension, and",
        "others), the first line of the file selects it:",
        "",
        "```yaml",
        f"# yaml-language-server: $schema=docs/{SCHEMA_FILE}",
        "```",
        "",
        "## Contents",
        "",
        "- [Value types](#value-types)",
        *[f"- [{'`' + s.path + '`' if s.path else 'Top level'}{' (' + s.note + ')' if s.note else ''}]"
          f"(#{s.anchor or 'top-level'})" for s in sections],
        "",
        '<a id="value-types"></a>',
        "",
        "## Value types",
        "",
        "| Type | What it accepts |",
        "|---|---|",
        *[f'| <a id="{name.replace(" ", "-")}"></a>{name} | {text} |' for name, text in VALUE_TYPES.items()],
        "",
    ]
    for section in sections:
        out += r.section(section)
    return "\n".join(out).rstrip("\n") + "\n"


def _used_value_types() -> set[str]:
    used = set()
    for section in _all_sections():
        for field in section.model.model_fields.values():
            doc = _doc_of(field)
            if doc is not None:
                used.add(doc.name)
    return used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporter.config.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--docs-dir", type=Path, default=Path("docs"), help="where to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is not current")
    args = parser.parse_args(argv)
    missing = _used_value_types() - set(VALUE_TYPES)
    if missing:
        print(f"value types without a description in VALUE_TYPES: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    stale = []
    for name, text in ((REFERENCE_FILE, reference_text()), (SCHEMA_FILE, schema_text())):
        path = args.docs_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(str(path))
        if not args.check:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if args.check and stale:
        print(f"not current: {', '.join(stale)}; run {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

