"""YAML, parsed once, with the line of every key kept.

PyYAML's safe loader composes the text into a node tree (which has line marks) and
constructs Python data from that tree; :func:`parse_yaml` does both steps on one parse
and indexes the lines by key path, so an error can say ``(line 14)``.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["parse_yaml"]


def _line_index(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int], seen: set[int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen:  # an alias: its keys are indexed where the anchor is (bounded, even when recursive)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = key_node.start_mark.line + 1
            _line_index(value_node, (*path, key), out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), out, seen)


def parse_yaml(text: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """``(data, lines)``: the document as Python data (safe loader: plain types only) and
    the 1-based line of each key path, e.g. ``("services", "redis", "probes", 0)``.
    An empty document is ``None``. Raises ``yaml.YAMLError`` (with ``problem_mark``)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        data = loader.construct_document(node)
    finally:
        loader.dispose()
    lines: dict[tuple[Any, ...], int] = {}
    _line_index(node, (), lines, set())
    return data, lines
