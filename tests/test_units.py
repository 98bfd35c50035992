"""The shipped systemd units: valid (systemd-analyze verify), and as little privilege
as each program allows (systemd-analyze security, offline)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .helpers import REPO, require_binary

UNITS = REPO / "deploy" / "systemd"


def installed(tmp_path: Path, name: str) -> Path:
    """The unit with its ExecStart pointing at this checkout's programs (verify checks they exist)."""
    unit = tmp_path / f"{name}.service"
    text = (UNITS / f"{name}.service").read_text()
    unit.write_text(text.replace("/opt/caretaker/.venv/bin/", f"{REPO / '.venv' / 'bin'}/"))
    return unit


@pytest.mark.parametrize(("name", "most"), [("caretaker-exporter", 2.5), ("caretaker-receiver", 8.5)])
def test_units_verify_and_expose_little(tmp_path: Path, name: str, most: float) -> None:
    analyze = require_binary("systemd-analyze")
    unit = installed(tmp_path, name)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                              capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert found, security.stdout[-500:] + security.stderr
    # The exporter only observes: sandboxed, two capabilities. The receiver's sandbox is
    # inherited by the services it starts, so only what no service needs is taken away.
    assert float(found.group(1)) <= most, security.stdout[-3000:]
