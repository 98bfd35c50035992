"""The configuration examples in README.md are valid configurations (docs must not drift)."""

from __future__ import annotations

import re

import pytest
import yaml

from exporter.config import parse_config

from .conftest import REPO

BLOCKS = [b for b in re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
          if re.search(r"^(services|receiver|exporter):", b, re.M)]


def test_readme_has_config_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example-{i}" for i in range(len(BLOCKS))])
def test_readme_config_example_is_valid(block: str) -> None:
    data = yaml.safe_load(block)
    data.setdefault("services", {"example": {"match": {"comm": "x"}}})
    parse_config(data)
