"""Files only their owner may read: caretaker's state, evidence and backups hold what
services and alerts said (a state file's secrets, a process's command line), so they
are created 0600 in directories created 0700, whatever the umask."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["private_dir", "write_private"]


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700 (existing ones are left
    as they are: they are the user's). Returns ``path``."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (a temporary file, then rename), mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
