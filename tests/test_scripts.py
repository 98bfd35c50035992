"""scripts/ensure-packages.sh: when it cannot install, it says exactly what to run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .helpers import REPO


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


def _fake_apt(tmp_path: Path, policy: Path, apt_status: int = 0) -> dict[str, str]:
    """A PATH whose apt-get records, at install time, what the policy file said; and a
    sudo that runs its command (so the script installs whether or not we are root)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "apt-calls"
    (fake_bin / "apt-get").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {record}\n'
        f'if [ "$1" = install ]; then {policy} >/dev/null 2>&1; echo "policy-exit=$?" >> {record}; fi\n'
        f"exit {apt_status}\n")
    (fake_bin / "sudo").write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    for name in ("apt-get", "sudo"):
        (fake_bin / name).chmod(0o755)
    return {**os.environ, "PATH": f"{fake_bin}:/usr/sbin:/usr/bin:/sbin:/bin", "CARETAKER_POLICY_RC_D": str(policy)}


def _install(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "ensure-packages.sh"), "caretaker-no-such-command:pkg-one"],
                          capture_output=True, text=True, timeout=30, env=env)


def test_install_with_a_policy_rc_d_already_there_succeeds_and_leaves_it(tmp_path: Path) -> None:
    # Docker-based Debian images ship /usr/sbin/policy-rc.d: the first `make test` must pass.
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# the image's own\nexit 101\n")
    policy.chmod(0o755)
    result = _install(_fake_apt(tmp_path, policy))
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert calls[0] == "update -qq"
    assert calls[1] == "install -y -qq --no-install-recommends pkg-one"
    assert calls[2] == "policy-exit=101"
    assert policy.read_text() == "#!/bin/sh\n# the image's own\nexit 101\n"


def test_install_without_a_policy_rc_d_makes_one_for_the_install_and_removes_it(tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    result = _install(_fake_apt(tmp_path, policy))
    assert result.returncode == 0, result.stderr
    assert "installing missing Debian packages: pkg-one" in result.stdout
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert calls[1:] == ["install -y -qq --no-install-recommends pkg-one", "policy-exit=101"]
    assert not policy.exists()


def test_a_failed_install_fails_the_script_and_still_removes_its_policy_rc_d(tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    result = _install(_fake_apt(tmp_path, policy, apt_status=100))
    assert result.returncode == 100
    assert not policy.exists()
