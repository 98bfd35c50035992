"""scripts/ensure-packages.sh: when it cannot install, it says exactly what to run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .conftest import REPO


def test_without_root_or_sudo_it_prints_the_apt_get_line(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sudo").write_text("#!/bin/sh\nexit 1\n")  # a sudo that always refuses
    (fake_bin / "sudo").chmod(0o755)
    script = REPO / "scripts" / "ensure-packages.sh"
    argv = [str(script), "caretaker-no-such-command-1:pkg-one", "sh:pkg-present", "caretaker-no-such-command-2:pkg-two"]
    if os.geteuid() == 0:  # drop to an unprivileged user so the script cannot install anything
        tmp_path.chmod(0o755)
        argv = ["runuser", "-u", "nobody", "--", "env", f"PATH={fake_bin}:/usr/bin:/bin", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PATH": f"{fake_bin}:/usr/sbin:/usr/bin:/sbin:/bin"})
    assert result.returncode == 1
    assert "sudo apt-get install --no-install-recommends pkg-one pkg-two" in result.stderr
    assert "pkg-present" not in result.stderr


def test_nothing_to_do_when_everything_is_there() -> None:
    result = subprocess.run([str(REPO / "scripts" / "ensure-packages.sh"), "sh:whatever"], capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
