"""Each repair against the real thing: processes, files, PostgreSQL, supervisord."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import pwd
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from exporter.config import parse_config
from exporter.procfs import ProcReader
from receiver.actions import RepairFailed, StepLog
from receiver.evidence import EvidenceKeeper
from receiver.repairs import BackupKeeper

from .helpers import (
    Children,
    MakeConfig,
    Postgres,
    free_port,
    log_text,
    port_open,
    process_state,
    processes,
    require_binary,
    serving,
    signal_caught,
    started_ticks_ago,
    supervisord_conf,
    wait_until,
)

SLEEPER = "import time\nwhile True: time.sleep(1)\n"
READY_THEN_SLEEPS = "import time; print('ready', flush=True)\nwhile True: time.sleep(1)\n"
"""Says it is ready, then loops (line 2) until it is stopped."""


def said_ready(log: Path) -> bool:
    return log.exists() and "ready" in log.read_text()


def marker() -> str:
    return f"rep-{uuid.uuid4().hex[:12]}"


# --- processes ---------------------------------------------------------------------------

async def test_stop_duplicates_keeps_the_oldest(run_repair: Any, children: Children, python: str,
                                                make_config: MakeConfig) -> None:
    mark = marker()
    first = children.start([python, "-c", SLEEPER, mark])
    await wait_until(lambda: started_ticks_ago(first.pid) > 0, 5, what="a start time later than the first's")
    others = [children.start([python, "-c", SLEEPER, mark]) for _ in range(2)]
    config = make_config(service={"match": {"cmdline": f"{mark}$"}, "processes": {"min": 1, "max": 1},
                                  "stop": {"grace_period": 1}, "remediation": {"allow": ["stop_duplicates"]}})
    await wait_until(lambda: len(processes(config)) == 3, 5)
    steps = await run_repair(config, "stop_duplicates")
    assert [p.pid for p in processes(config)] == [first.pid]
    for p in others:
        assert await asyncio.to_thread(p.wait, 5) == -signal.SIGTERM
    assert f"keeping [{first.pid}]" in log_text(steps)
    assert "evidence kept" in log_text(steps)


async def test_stop_duplicates_keeps_the_process_its_pidfile_names(run_repair: Any, children: Children, python: str,
                                                                  tmp_path: Path, make_config: MakeConfig) -> None:
    mark = marker()
    first = children.start([python, "-c", SLEEPER, mark])
    await wait_until(lambda: started_ticks_ago(first.pid) > 0, 5, what="a start time later than the first's")
    main = children.start([python, "-c", SLEEPER, mark])  # younger, but the one the pidfile names
    (tmp_path / "svc.pid").write_text(f"{main.pid}\n")
    config = make_config(service={"match": {"cmdline": f"{mark}$", "pidfile": "svc.pid"},
                                  "processes": {"min": 1, "max": 1}, "stop": {"grace_period": 1},
                                  "remediation": {"allow": ["stop_duplicates"]}})
    await wait_until(lambda: len(processes(config)) == 2, 5)
    steps = await run_repair(config, "stop_duplicates")
    assert f"keeping [{main.pid}], stopping [{first.pid}]" in log_text(steps)
    assert await asyncio.to_thread(first.wait, 5) == -signal.SIGTERM
    assert [p.pid for p in processes(config)] == [main.pid]


async def test_free_port_stops_the_squatter_and_starts_the_service(run_repair: Any, children: Children, python: str,
                                                                   make_config: MakeConfig) -> None:
    port, mark = free_port(), marker()
    squat = ("import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             f"s.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(60)\n")
    squatter = children.start([python, "-c", squat, "squatter"])
    await wait_until(lambda: port_open(port), 10)
    config = make_config(service={
        "match": {"cmdline": f"{mark}$"}, "ports": [port], "stop": {"grace_period": 1},
        "probes": [{"name": "port", "type": "tcp", "port": port}],
        "start": {"argv": [python, "-c", f"import http.server as h\nh.test(h.SimpleHTTPRequestHandler, "
                                         f"port={port}, bind='127.0.0.1')", mark]},
        "remediation": {"allow": ["free_port"], "verify_timeout": 10}})
    steps = await run_repair(config, "free_port")
    assert await asyncio.to_thread(squatter.wait, 5) is not None
    assert f"held by pid {squatter.pid}" in log_text(steps)
    assert log_text(steps).splitlines()[-1].startswith("verified: 1 processes")


async def test_signal_reaches_the_top_process(run_repair: Any, children: Children, python: str, tmp_path: Path,
                                              make_config: MakeConfig) -> None:
    mark, flag = marker(), tmp_path / "hup"
    script = (f"import signal, time, pathlib\nsignal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(flag)!r})"
              ".write_text('reloaded'))\nwhile True: time.sleep(0.1)\n")
    proc = children.start([python, "-c", script, mark])
    config = make_config(service={"match": {"cmdline": f"{mark}$"},
                                  "remediation": {"allow": ["signal"], "signal": {"signal": "HUP"}}})
    await wait_until(lambda: signal_caught(proc.pid, signal.SIGHUP), 5, what="its SIGHUP handler")
    await run_repair(config, "signal")
    await wait_until(flag.exists, 5, what="SIGHUP handled")


async def test_restart_through_supervisord(run_repair: Any, tmp_path: Path, python: str,
                                           make_config: MakeConfig) -> None:
    supervisord = require_binary("supervisord")
    require_binary("supervisorctl")
    mark = marker()
    conf = supervisord_conf(tmp_path, f"""command={python} -c "import time; time.sleep(600)" {mark}
startsecs=0
stopwaitsecs=2
""")
    daemon = subprocess.Popen([supervisord, "-c", str(conf)], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        config = make_config(service={"match": {"cmdline": f"{mark}$"},
                                      "start": {"supervisor": {"program": "worker", "config": str(conf)}},
                                      "remediation": {"allow": ["restart"], "verify_timeout": 10}})
        await wait_until(lambda: len(processes(config)) == 1, 15, what="supervisord to start the program")
        (before,) = processes(config)
        steps = await run_repair(config, "restart")
        (after,) = processes(config)
        assert after.pid != before.pid and after.ppid == daemon.pid
        assert "supervisorctl -c" in log_text(steps) and "restart worker: exit status 0" in log_text(steps)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 15)


async def test_restart_through_systemd_calls_systemctl(run_repair: Any, tmp_path: Path, children: Children, python: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       make_config: MakeConfig) -> None:
    """systemd cannot run here (it is not PID 1): a stand-in systemctl records its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    mark = marker()
    children.start([python, "-c", SLEEPER, mark])
    config = make_config(service={"match": {"cmdline": f"{mark}$"}, "start": {"systemd_unit": "app@1.service"},
                                  "remediation": {"allow": ["restart"], "verify_timeout": 5}})
    await wait_until(lambda: processes(config), 5)
    await run_repair(config, "restart")
    assert calls.read_text() == "restart app@1.service\n"


@pytest.mark.parametrize("user", [None, "nobody"])
async def test_evidence_of_a_frozen_python_process(run_repair: Any, make_config: MakeConfig, tmp_path: Path,
                                                   python: str, user: str | None) -> None:
    if user is not None and os.geteuid() != 0:
        pytest.skip("starting a service as another user needs root (CI runs as root)")
    if user is not None:
        tmp_path.chmod(0o755)  # the service's user must reach its cwd
    mark = marker()
    log = tmp_path / "app.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    start: dict[str, Any] = {"argv": [python, "-c", READY_THEN_SLEEPS, mark], "log_file": "svc.log",
                             **({"user": user} if user else {})}
    config = make_config(service={
        "match": {"cmdline": f"{mark}$"}, "start": start,
        "logs": [{"path": "app.log"}], "stop": {"grace_period": 0.5},
        "remediation": {"allow": ["restart"], "verify_timeout": 10}},
        evidence={"log_lines": 5, "max_bytes": 10**6})
    from receiver.process import start_service
    child = start_service(config, "svc")
    await wait_until(lambda: processes(config), 5)
    if user is not None:  # really another user's process (once setpriv has exec'd it, same pid)
        def uid() -> str:
            line = next(x for x in Path(f"/proc/{child.pid}/status").read_text().splitlines() if x.startswith("Uid:"))
            return line.split()[1]
        await wait_until(lambda: uid() == str(pwd.getpwnam(user).pw_uid), 5, what=f"the service to run as {user}")
    # Frozen in its loop, not while the interpreter starts: it said so, and sleeps (state S).
    await wait_until(lambda: said_ready(tmp_path / "svc.log") and process_state(child.pid) == "S", 10,
                     what="the service to sleep in its loop")
    os.kill(child.pid, signal.SIGSTOP)
    await wait_until(lambda: processes(config)[0].state == "T", 5)
    steps = await run_repair(config, "restart")
    await asyncio.to_thread(child.wait, 5)
    path = next(s["evidence"] for s in steps.steps if "evidence" in s)
    evidence = json.loads(Path(path).read_text())
    (proc,) = evidence["processes"]
    assert (proc["pid"], proc["state"]) == (child.pid, "T")
    assert proc["wchan"] and proc["cmdline"].endswith(mark)
    assert evidence["logs"][str(log)] == [f"line {i}" for i in range(95, 100)]
    assert "<module> (<string>:2)" in evidence["py_spy"][str(child.pid)]  # where the frozen process was


async def test_evidence_has_the_stacks_of_a_python_process_whatever_its_name(make_config: MakeConfig, tmp_path: Path,
                                                                            children: Children, python: str) -> None:
    """gunicorn, uvicorn and celery run as python3.x, named (comm) after their script:
    py-spy is chosen by the executable. prctl(PR_SET_NAME) names this one gunicorn."""
    script = ("import ctypes, time\nctypes.CDLL(None).prctl(15, b'gunicorn', 0, 0, 0)\n"
              "while True: time.sleep(1)\n")
    named = children.start([python, "-c", script, marker()])
    other = children.start(["sleep", "60"])
    await wait_until(lambda: Path(f"/proc/{named.pid}/comm").read_text() == "gunicorn\n"
                     and process_state(named.pid) == "S", 5, what="the new name, and its loop")
    reader = ProcReader()
    procs = [reader.stat(named.pid), reader.stat(other.pid)]
    assert [p.comm for p in procs if p is not None] == ["gunicorn", "sleep"]
    steps = StepLog()
    await EvidenceKeeper(make_config(service={"match": {"comm": "x"}}), tmp_path / "ev", reader)(
        "svc", [p for p in procs if p is not None], steps)
    evidence = json.loads(Path(steps.steps[-1]["evidence"]).read_text())
    assert set(evidence["py_spy"]) == {str(named.pid)}  # not sleep: no Python there
    assert "<module> (<string>:3)" in evidence["py_spy"][str(named.pid)]


def test_evidence_directory_is_bounded(tmp_path: Path, make_config: MakeConfig) -> None:
    config = make_config(service={"match": {"comm": "x"}}, evidence={"max_bytes": 3000})
    keeper = EvidenceKeeper(config, tmp_path / "ev", ProcReader())
    for i in range(10):
        keeper._write("svc", {"i": i, "pad": "x" * 1000})
    total = sum(f.stat().st_size for f in (tmp_path / "ev").glob("*.json"))
    assert total <= 3000 and len(list((tmp_path / "ev").glob("*.json"))) >= 1


# --- files -----------------------------------------------------------------------------------

async def test_rotate_logs_renames_reopens_and_compresses(run_repair: Any, children: Children, python: str,
                                                          tmp_path: Path, make_config: MakeConfig) -> None:
    mark, log = marker(), tmp_path / "w.log"
    # As a daemon does it: the handler only sets a flag, the loop reopens. (Closing the
    # file in the handler could land between `f.write` being looked up and called,
    # and the writer died writing to a closed file: this test failed now and then.)
    writer = (f"import signal, time\npath = {str(log)!r}\nf = open(path, 'a', buffering=1)\n"
              "hup = False\ndef on_hup(*a):\n    global hup\n    hup = True\n"
              "signal.signal(signal.SIGHUP, on_hup)\ni = 0\n"
              "while True:\n    if hup:\n        hup = False\n        f.close()\n"
              "        f = open(path, 'a', buffering=1)\n"
              "    f.write(f'line {i}\\n'); i += 1; time.sleep(0.02)\n")
    children.start([python, "-c", writer, mark])
    config = make_config(service={"match": {"cmdline": f"{mark}$"}, "logs": [{"path": "w.log"}],
                                  "remediation": {"allow": ["rotate_logs"],
                                                  "rotate_logs": {"keep": 2, "reopen_signal": "SIGHUP"}}})
    await wait_until(lambda: log.exists() and log.stat().st_size > 100, 5)
    for _ in range(3):
        steps = log_text(await run_repair(config, "rotate_logs"))
        assert "renamed to w.log.1" in steps and "SIGHUP" in steps, steps
        await wait_until(lambda: log.stat().st_size > 0, 5)  # the writer reopened the new file
    names = sorted(p.name for p in tmp_path.glob("w.log*"))
    assert names == ["w.log", "w.log.1", "w.log.2.gz"]
    lines = [int(x.split()[1]) for x in gzip.open(tmp_path / "w.log.2.gz", "rt").read().split("\n") if x]
    assert lines == sorted(lines)


async def test_rotate_logs_copytruncate(run_repair: Any, tmp_path: Path, make_config: MakeConfig) -> None:
    log = tmp_path / "c.log"
    log.write_text("a\nb\n")
    config = make_config(service={"match": {"comm": "^none$"}, "logs": [{"path": "c.log"}],
                                  "remediation": {"allow": ["rotate_logs"],
                                                  "rotate_logs": {"copytruncate": True, "keep": 3}}})
    inode = log.stat().st_ino
    await run_repair(config, "rotate_logs")
    assert log.stat().st_ino == inode and log.read_text() == ""
    assert (tmp_path / "c.log.1").read_text() == "a\nb\n"


async def test_clean_deletes_old_matches_only_inside_and_never_through_symlinks(run_repair: Any, tmp_path: Path,
                                                                                make_config: MakeConfig) -> None:
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    (cache / "sub").mkdir(parents=True)
    outside.mkdir()
    old = time.time() - 3 * 86400
    for path, size in ((cache / "a.tmp", 100), (cache / "sub" / "b.tmp", 50), (cache / "keep.dat", 10),
                       (cache / "new.tmp", 7), (outside / "victim.tmp", 1000)):
        path.write_bytes(b"x" * size)
        if path.name != "new.tmp":
            os.utime(path, (old, old))
    (cache / "link").symlink_to(outside)
    (cache / "link.tmp").symlink_to(outside / "victim.tmp")
    config = make_config(service={"match": {"comm": "^none$"}, "remediation": {
        "allow": ["clean"], "clean": [{"directory": "cache", "glob": "*.tmp", "older_than": "1d"}]}})
    steps = await run_repair(config, "clean")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink()) == [
        "cache/keep.dat", "cache/link", "cache/link.tmp", "cache/new.tmp", "outside/victim.tmp"]
    assert steps.steps[-1]["bytes_freed"] == 150


async def test_ensure_paths(run_repair: Any, tmp_path: Path, make_config: MakeConfig) -> None:
    (tmp_path / "wrong").mkdir(mode=0o777)
    os.chmod(tmp_path / "wrong", 0o777)
    config = make_config(service={"match": {"comm": "^none$"},
                                  "directories": [{"path": "a/b", "mode": "0750"}, {"path": "wrong", "mode": "0700"}],
                                  "remediation": {"allow": ["ensure_paths"]}})
    await run_repair(config, "ensure_paths")
    assert (tmp_path / "a/b").is_dir() and (tmp_path / "a/b").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "wrong").stat().st_mode & 0o777 == 0o700


async def test_restore_file_from_the_newest_valid_backup(run_repair: Any, tmp_path: Path,
                                                         make_config: MakeConfig) -> None:
    state = tmp_path / "state.json"
    config = make_config(service={"match": {"comm": "^none$"},
                                  "files": [{"path": "state.json", "format": "json", "backups": 2}],
                                  "remediation": {"allow": ["restore_file"]}})
    keeper = BackupKeeper(config, tmp_path / "backups")
    for version in (1, 2, 3):
        state.write_text(json.dumps({"version": version}))
        os.utime(state, (time.time() + version, time.time() + version))
        assert keeper.run_once() == 1
    state.write_text('{"version": 4, "half-writ')
    assert keeper.run_once() == 0  # an invalid file is never backed up
    assert len(list(keeper.folder("svc", config.services["svc"].files[0]).iterdir())) == 2
    steps = await run_repair(config, "restore_file")
    assert json.loads(state.read_text()) == {"version": 3}
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert aside.read_text() == '{"version": 4, "half-writ'
    assert "restored the backup" in log_text(steps)


async def test_restore_file_default_or_fail(run_repair: Any, tmp_path: Path, make_config: MakeConfig) -> None:
    (tmp_path / "default.json").write_text('{"fresh": true}')
    (tmp_path / "a.json").write_text("{broken")
    config = make_config(service={"match": {"comm": "^none$"},
                                  "files": [{"path": "a.json", "format": "json", "default": "default.json"}],
                                  "remediation": {"allow": ["restore_file"]}})
    await run_repair(config, "restore_file")
    assert json.loads((tmp_path / "a.json").read_text()) == {"fresh": True}
    (tmp_path / "b.yml").write_text("a: [unclosed")
    config = make_config(service={"match": {"comm": "^none$"}, "files": [{"path": "b.yml", "format": "yaml"}],
                                  "remediation": {"allow": ["restore_file"]}})
    with pytest.raises(RepairFailed, match="no valid backup and no default"):
        await run_repair(config, "restore_file")
    assert list(tmp_path.glob("b.yml.corrupt-*"))  # the corrupt copy is kept, nothing is lost


# --- database, endpoint, command ------------------------------------------------------------

async def test_vacuum_on_a_real_postgres(run_repair: Any, postgres_server: Postgres, tmp_path: Path,
                                         make_config: MakeConfig) -> None:
    import asyncpg
    (tmp_path / "pw").write_text(postgres_server.password)
    conn = await asyncpg.connect(host="127.0.0.1", port=postgres_server.port, user="postgres",
                                 password=postgres_server.password, ssl="disable")
    await conn.execute("CREATE TABLE IF NOT EXISTS events (id serial PRIMARY KEY, body text)")
    await conn.execute("INSERT INTO events (body) SELECT 'x' FROM generate_series(1, 1000)")
    await conn.execute("DELETE FROM events WHERE id % 2 = 0")
    base = {"port": postgres_server.port, "password": {"file": "pw"}, "tls": "disable"}
    config = make_config(service={"match": {"comm": "^none$"}, "remediation": {
        "allow": ["vacuum"], "vacuum": {**base, "tables": ["public.events"], "statement_timeout": "30s"}}})
    steps = await run_repair(config, "vacuum")
    assert 'VACUUM (ANALYZE) public.events took' in log_text(steps)
    analyzed = await conn.fetchval("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'events'")
    await conn.close()
    assert analyzed is not None
    config = make_config(service={"match": {"comm": "^none$"}, "remediation": {
        "allow": ["vacuum"], "vacuum": {**base, "tables": ["no_such_table"]}}})
    with pytest.raises(RepairFailed, match="no_such_table"):
        await run_repair(config, "vacuum")


async def test_http_action(run_repair: Any, make_config: MakeConfig) -> None:
    calls: list[str] = []

    async def reset(request: web.Request) -> web.Response:
        calls.append(request.method)
        return web.Response(status=204 if request.path == "/reset" else 500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reset)
    async with serving(app) as port:
        for path, ok in (("/reset", True), ("/broken", False)):
            config = make_config(service={"match": {"comm": "^none$"}, "remediation": {
                "allow": ["http"], "http": {"url": f"http://127.0.0.1:{port}{path}"}}})
            if ok:
                await run_repair(config, "http")
            else:
                with pytest.raises(RepairFailed, match="answered 500"):
                    await run_repair(config, "http")
    assert calls == ["POST", "POST"]


async def test_exec_fills_declared_placeholders_only_as_whole_argv_items(run_repair: Any, tmp_path: Path,
                                                                         make_config: MakeConfig) -> None:
    out = tmp_path / "argv.json"
    script = f"import json, sys; json.dump(sys.argv[1:], open({str(out)!r}, 'w'))"
    config = make_config(service={"match": {"comm": "^none$"}, "remediation": {"allow": ["exec"], "exec": {
        "argv": [sys.executable, "-c", script, "--conversation", "{conversation}"],
        "labels": {"conversation": "[a-z0-9-]{1,36}"}}}})
    await run_repair(config, "exec", {"conversation": "abc-123", "other": "x"})
    assert json.loads(out.read_text()) == ["--conversation", "abc-123"]
    canary = tmp_path / "pwned"
    for labels in ({"conversation": f"abc; touch {canary}"}, {"conversation": "$(id)"}, {}):
        with pytest.raises(RepairFailed):
            await run_repair(config, "exec", labels)
    assert not canary.exists()


def test_exec_placeholders_must_be_declared_and_whole() -> None:
    from exporter.config import ConfigError
    for argv, labels in ((["x", "{a}"], {}), (["x", "--id={a}"], {"a": ".*"})):
        with pytest.raises(ConfigError):
            parse_config({"services": {"s": {"match": {"comm": "x"}, "remediation": {
                "allow": ["exec"], "exec": {"argv": argv, "labels": labels}}}}})
