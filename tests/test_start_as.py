"""Services start as systemd would run them: their own user, a clean environment,
their limits and umask; and never with the receiver's credentials."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from exporter.config import Config, ConfigError, parse_config
from exporter.environment import minimal_environment
from exporter.procfs import ProcReader, scan_services
from receiver.actions import StepLog, restart
from receiver.process import launch_argv, start_problems

from .helpers import REPO, build_config, sleeper

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")


def service(tmp_path: Path, **start: Any) -> Config:
    """Service ``svc`` (:func:`helpers.sleeper`), its ``start`` given ``start``'s keys (the user,
    environment and limits this module is about); ``api-key`` holds a secret for its env."""
    (tmp_path / "api-key").write_text("from-a-file\n")
    svc = sleeper()
    return build_config(tmp_path, service={**svc, "start": {**svc["start"], "log_file": "logs/svc.log", **start}})


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if item)


def limit(pid: int, name: str) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            soft, hard = line[len(name):].split()[:2]
            return soft, hard
    raise AssertionError(f"no {name} in /proc/{pid}/limits")


def status(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(key)


@needs_root
async def test_a_service_runs_as_its_user_with_only_the_environment_the_config_gives(
        ctx_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path.chmod(0o755)  # the service's user must reach its cwd
    monkeypatch.setenv("CARETAKER_TOKEN", "the-receivers-own-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-services")
    monkeypatch.setenv("TZ", "Europe/Paris")
    config = service(tmp_path, user="nobody", umask="027", inherit_env=["TZ", "NOT_SET_ANYWHERE"],
                     env={"MODE": "production", "API_KEY": {"file": "api-key"}, "TOKEN_COPY": {"env": "TZ"}},
                     limits={"nofile": 1234, "core": 0, "nproc": 4096})
    nobody = pwd.getpwnam("nobody")
    ctx = ctx_for(config)
    steps = StepLog()
    await restart(ctx, "svc", steps)
    (proc,) = scan_services(ProcReader(), config.services, (os.getpid(),))["svc"]
    assert status(proc.pid, "Uid").split() == [str(nobody.pw_uid)] * 4
    assert status(proc.pid, "Gid").split() == [str(nobody.pw_gid)] * 4
    assert status(proc.pid, "Groups").split() == [str(g) for g in os.getgrouplist("nobody", nobody.pw_gid)]
    assert status(proc.pid, "CapEff") == "0000000000000000"
    assert status(proc.pid, "Umask") == "0027"
    env = environ(proc.pid)
    assert env == {"PATH": os.environ["PATH"], "LANG": os.environ.get("LANG") or "C.UTF-8",
                   "TZ": "Europe/Paris", "HOME": nobody.pw_dir, "USER": "nobody", "LOGNAME": "nobody",
                   "MODE": "production", "API_KEY": "from-a-file", "TOKEN_COPY": "Europe/Paris"}
    assert limit(proc.pid, "Max open files") == ("1234", "1234")
    assert limit(proc.pid, "Max core file size") == ("0", "0")
    assert limit(proc.pid, "Max processes") == ("4096", "4096")
    log = tmp_path / "logs" / "svc.log"
    assert (log.stat().st_uid, log.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)  # created for it
    assert proc.comm.startswith("python")  # the wrappers exec'd away: the pid is the service's


def test_without_a_user_the_environment_is_still_clean(tmp_path: Path) -> None:
    config = service(tmp_path, env={"A": "1"})
    assert launch_argv(config.services["svc"].start) == list(config.services["svc"].start.argv)
    assert minimal_environment(["X"], {"A": "1"}, source={"PATH": "/bin", "X": "x", "SECRET": "s"}) == {
        "PATH": "/bin", "LANG": "C.UTF-8", "X": "x", "A": "1"}


def test_an_unknown_user_or_group_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        service(tmp_path, user="caretaker-no-such-user", group="caretaker-no-such-group")
    assert "services.svc.start.user: no user 'caretaker-no-such-user' on this machine" in str(err.value)
    assert "services.svc.start.group: no group 'caretaker-no-such-group' on this machine" in str(err.value)
    with pytest.raises(ConfigError, match="user, group, umask, limits, env and inherit_env are for argv"):
        parse_config({"services": {"s": {"match": {"comm": "x"},
                                         "start": {"systemd_unit": "x.service", "user": "nobody"}}}})


@needs_root
def test_a_user_the_receiver_cannot_become_is_refused_with_exit_2(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="caretaker-as-"))  # pytest's tmp dirs are 0700: not for nobody
    try:
        folder.chmod(0o755)
        (folder / "caretaker.yml").write_text(
            "services:\n  svc:\n    match: {comm: x}\n    start: {argv: [/bin/true], user: root}\n")
        (folder / "caretaker.yml").chmod(0o644)
        nobody = pwd.getpwnam("nobody")
        # A receiver running as nobody: imported as root, then the privileges dropped, then its main.
        code = ("import os, sys\nfrom receiver.app import main\n"
                f"os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
                "main(sys.argv[1:])\n")
        result = subprocess.run([sys.executable, "-c", code, "--check-config", "--config",
                                 str(folder / "caretaker.yml")], capture_output=True, text=True, timeout=60,
                                cwd=REPO)
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 2, result.stderr
    assert f"services.svc.start.user: the receiver runs as uid {nobody.pw_uid}, not root, and cannot start " \
           "processes as root (uid 0)" in result.stderr
    assert start_problems(service(tmp_path, user="nobody")) == []  # as root, it may


def test_the_group_defaults_to_the_users(tmp_path: Path) -> None:
    config = service(tmp_path, user="nobody", group=grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name)
    argv = launch_argv(config.services["svc"].start)
    if os.geteuid() == 0:
        assert argv[:4] == ["setpriv", f"--reuid={pwd.getpwnam('nobody').pw_uid}",
                            f"--regid={pwd.getpwnam('nobody').pw_gid}", "--init-groups"]
