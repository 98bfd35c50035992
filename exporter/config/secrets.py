"""Secrets (tokens, passwords): never inline, read from a file or an environment variable."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from .errors import ConfigError
from .types import FilePath, Model

__all__ = ["Secret", "read_secret"]


class Secret(Model):
    """A secret read from a file (its content, stripped) or an environment variable:
    ``{file: secrets/token}`` or ``{env: CARETAKER_TOKEN}``, exactly one of them. It is
    read when it is used, so a file written after the config was checked is found."""

    file: FilePath | None = Field(default=None, examples=["secrets/receiver-token"])
    """File holding the secret (its content, surrounding white space stripped)."""
    env: str | None = Field(default=None, examples=["CARETAKER_TOKEN"])
    """Environment variable holding the secret (of the program that reads it)."""

    def cross_check(self) -> Iterator[str]:
        if (self.file is None) == (self.env is None):
            yield "give exactly one of file, env"


def read_secret(secret: Secret, base_dir: Path) -> str:
    """The secret's value; raises ``ConfigError`` when it cannot be read or is empty."""
    where = f"file {secret.file}" if secret.file else f"environment variable {secret.env}"
    if secret.file is not None:
        path = base_dir / os.path.expanduser(secret.file)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(str(path), [f"cannot read secret: {err.strerror}"]) from err
    else:
        value = os.environ.get(secret.env or "", "").strip()
    if not value:
        raise ConfigError("config", [f"secret from {where} is empty or missing"])
    return value
