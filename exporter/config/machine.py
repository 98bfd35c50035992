"""What the configuration names on this machine: the programs it runs and their
working directories, looked up the way they will be run.

These are facts about the machine now, not about the file: a program may be on a
volume not mounted yet, or installed after the config was written. So they are not
load errors. ``--check-config`` asks for them (``load_config(path, machine=True)``)
and reports them as errors, beside the file's own, with their places (exit 2: the
file does not work here, now). When the programs start, :func:`machine_problems`
gives them as warnings; a repair that would run a missing program fails then, and is
recorded and retried like any other.

A program is looked up as ``subprocess`` runs it: a name with a slash is a path
(relative to the working directory, which the child enters first); a bare name is
looked up on the PATH the program gets (the receiver's own, or the one ``start.env``
sets). The PATH is this process's, so run the check as the programs run.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ..environment import minimal_environment
from .types import resolve_path

if TYPE_CHECKING:
    from .model import Config
    from .probes import ExecProbe
    from .remediation import ExecAction
    from .service import ServiceConfig, Start

__all__ = ["exec_action_problems", "exec_probe_problems", "machine_problems", "service_problems", "start_problems"]

Loc = tuple[str | int, ...]
Found = list[tuple[Loc, str]]


def _directory_problem(path: Path) -> str | None:
    if not path.exists():
        return f"directory {path} does not exist"
    if not path.is_dir():
        return f"{path} is not a directory"
    return None


def _runnable(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def _program_problem(program: str, cwd: Path, search_path: str) -> str | None:
    if "/" in program:
        path = cwd / program
        if not path.exists():
            return f"program {path} does not exist"
        if not _runnable(path):
            return f"program {path} is not an executable file"
        return None
    if any(_runnable(cwd / entry / program) for entry in search_path.split(os.pathsep)):
        return None
    return f"program {program!r} is not on the PATH it gets ({search_path})"


def _run_problems(program: str, cwd: Path, cwd_given: bool, search_path: str) -> Found:
    if cwd_given:
        problem = _directory_problem(cwd)
        if problem is not None:
            return [(("cwd",), problem)]  # the program is looked up from there: one problem is enough
    problem = _program_problem(program, cwd, search_path)
    return [(("argv", 0), problem)] if problem is not None else []


def start_problems(start: Start, base_dir: Path) -> Found:
    """``start.argv[0]`` and ``start.cwd``, as the receiver runs them (receiver/actions.py
    ``start_service``); ``(location in start, message)`` each."""
    if start.argv is None:
        return []
    given = {k: v for k, v in start.env.items() if isinstance(v, str)}
    search = minimal_environment(start.inherit_env, given)["PATH"]
    cwd = resolve_path(base_dir, start.cwd) if start.cwd else base_dir
    return _run_problems(start.argv[0], cwd, start.cwd is not None, search)


def exec_probe_problems(probe: ExecProbe, base_dir: Path) -> Found:
    """An exec probe's ``argv[0]`` and ``cwd``, as exporter/probes.py runs them."""
    cwd = resolve_path(base_dir, probe.cwd) if probe.cwd else base_dir
    return _run_problems(probe.argv[0], cwd, probe.cwd is not None, minimal_environment()["PATH"])


def exec_action_problems(action: ExecAction, base_dir: Path) -> Found:
    """The ``exec`` repair's ``argv[0]`` (run in the config's directory), unless it is an
    alert label (``{name}``)."""
    program = action.argv[0]
    if program.startswith("{") and program.endswith("}"):
        return []
    return _run_problems(program, base_dir, False, minimal_environment()["PATH"])


def service_problems(service: ServiceConfig, base_dir: Path) -> Found:
    """Everything a service runs (``start``, exec probes, the ``exec`` repair), looked up;
    ``(location in the service, message)`` each."""
    found: Found = []
    if service.start is not None:
        found += [(("start", *loc), m) for loc, m in start_problems(service.start, base_dir)]
    for i, probe in enumerate(service.probes):
        if probe.type == "exec":
            found += [(("probes", i, *loc), m) for loc, m in exec_probe_problems(probe, base_dir)]
    if service.remediation.exec is not None:
        found += [(("remediation", "exec", *loc), m)
                  for loc, m in exec_action_problems(service.remediation.exec, base_dir)]
    return found


def machine_problems(config: Config) -> list[str]:
    """Programs the config runs that cannot be found or executed now, and working
    directories that do not exist: one ``place (line N): message`` each."""
    return [f"{config.place(('services', name, *loc))}: {message}"
            for name, cfg in config.services.items() for loc, message in service_problems(cfg, config.base_dir)]
