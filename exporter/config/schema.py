"""The JSON Schema of the configuration, for editors (``yaml-language-server``) and
other tools; ``caretaker-exporter --print-schema`` prints it, and a checked-in copy is
docs/caretaker.schema.json.

It is pydantic's schema of :class:`~.model.Config` (validation mode), so it accepts what
the loader accepts: durations as ``"10s"`` strings or numbers, signals as names or
numbers. It is looser in what only code can check (cross-field rules, regexes that
compile, users that exist); those errors come from ``--check-config``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from .model import Config

__all__ = ["json_schema", "plain_text", "schema_text"]


def plain_text(doc: str) -> str:
    """A docstring as text: paragraphs kept, lines joined, ``code`` as `code` (Markdown)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc.strip())]
    return re.sub(r"``(.+?)``", r"`\1`", "\n\n".join(p for p in paragraphs if p))


class _Generator(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # "Max Scrape Timeout" says less than the key itself


def _clean(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: plain_text(v) if k == "description" and isinstance(v, str) else _clean(v) for k, v in node.items()}
        if "patternProperties" in out:  # a mapping whose keys have a pattern (service names): others are errors
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    """The schema as a JSON-ready dict (draft 2020-12)."""
    schema = _clean(Config.model_json_schema(mode="validation", schema_generator=_Generator))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "caretaker configuration (caretaker.yml)", **{k: v for k, v in schema.items() if k != "title"}}


def schema_text() -> str:
    """The schema as the checked-in file holds it."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
