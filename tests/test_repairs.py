"""Each repair against the real thing: processes, files, PostgreSQL, supervisord."""

from __future__ import annotations

import gzip
import json
import os
import pwd
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.config import parse_config
from exporter.procfs import ProcReader, scan_services
from receiver.actions import ActionContext, RepairFailed, StepLog
from receiver.catalogue import run_action
from receiver.evidence import EvidenceKeeper
from receiver.repairs import BackupKeeper

from .conftest import Children, Postgres, free_port, port_open, require_binary, stop_config_services, wait_for

SLEEPER = "import time\nwhile True: time.sleep(1)\n"


def marker() -> str:
    return f"rep-{uuid.uuid4().hex[:12]}"


def config_for(tmp_path: Path, service: dict[str, Any], **receiver: Any) -> Any:
    return parse_config({"receiver": {"state_file": "state.sqlite", **receiver}, "services": {"svc": service}},
                        base_dir=tmp_path)


@pytest.fixture
async def run() -> AsyncIterator[Callable[..., Any]]:
    """run(config, action, labels={}) -> StepLog; stops the config's processes afterwards."""
    configs: list[Any] = []
    contexts: list[ActionContext] = []
    async with aiohttp.ClientSession() as session:
        async def go(config: Any, action: str, labels: dict[str, str] | None = None) -> StepLog:
            configs.append(config)
            state = config.resolve(config.receiver.state_file).parent
            ctx = ActionContext(config, session, ProcReader(), labels=labels or {},
                                backups=BackupKeeper(config, state / "backups"),
                                evidence=EvidenceKeeper(config, state / "evidence", ProcReader()))
            contexts.append(ctx)
            steps = StepLog()
            await run_action(ctx, action, "svc", steps)
            return steps
        yield go
    for config in configs:
        stop_config_services(config)
    for ctx in contexts:
        reaper = ctx.reaper
        wait_for(lambda: (reaper.reap(), not reaper.children)[1], 5)  # noqa: B023


def messages(steps: StepLog) -> str:
    return "\n".join(s["message"] for s in steps.steps)


def procs_of(config: Any) -> list[Any]:
    return scan_services(ProcReader(), config.services, (os.getpid(),))["svc"]


# --- processes ---------------------------------------------------------------------------

async def test_stop_duplicates_keeps_the_oldest(run: Any, children: Children, python: str, tmp_path: Path) -> None:
    mark = marker()
    first = children.start([python, "-c", SLEEPER, mark])
    time.sleep(0.2)
    others = [children.start([python, "-c", SLEEPER, mark]) for _ in range(2)]
    config = config_for(tmp_path, {"match": {"cmdline": f"{mark}$"}, "processes": {"min": 1, "max": 1},
                                   "stop": {"grace_period": 1}, "remediation": {"allow": ["stop_duplicates"]}})
    wait_for(lambda: len(procs_of(config)) == 3, 5)
    steps = await run(config, "stop_duplicates")
    assert [p.pid for p in procs_of(config)] == [first.pid]
    for p in others:
        assert p.wait(5) == -signal.SIGTERM
    assert f"keeping [{first.pid}]" in messages(steps)
    assert "evidence kept" in messages(steps)


async def test_stop_duplicates_keeps_the_process_its_pidfile_names(run: Any, children: Children, python: str,
                                                                  tmp_path: Path) -> None:
    mark = marker()
    first = children.start([python, "-c", SLEEPER, mark])
    time.sleep(0.2)
    main = children.start([python, "-c", SLEEPER, mark])  # younger, but the one the pidfile names
    (tmp_path / "svc.pid").write_text(f"{main.pid}\n")
    config = config_for(tmp_path, {"match": {"cmdline": f"{mark}$", "pidfile": "svc.pid"},
                                   "processes": {"min": 1, "max": 1}, "stop": {"grace_period": 1},
                                   "remediation": {"allow": ["stop_duplicates"]}})
    wait_for(lambda: len(procs_of(config)) == 2, 5)
    steps = await run(config, "stop_duplicates")
    assert f"keeping [{main.pid}], stopping [{first.pid}]" in messages(steps)
    assert first.wait(5) == -signal.SIGTERM
    assert [p.pid for p in procs_of(config)] == [main.pid]


async def test_free_port_stops_the_squatter_and_starts_the_service(run: Any, children: Children, python: str,
                                                                   tmp_path: Path) -> None:
    port, mark = free_port(), marker()
    squat = ("import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             f"s.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(60)\n")
    squatter = children.start([python, "-c", squat, "squatter"])
    wait_for(lambda: port_open(port), 10)
    config = config_for(tmp_path, {
        "match": {"cmdline": f"{mark}$"}, "ports": [port], "stop": {"grace_period": 1},
        "probes": [{"name": "port", "type": "tcp", "port": port}],
        "start": {"argv": [python, "-c", f"import http.server as h\nh.test(h.SimpleHTTPRequestHandler, "
                                         f"port={port}, bind='127.0.0.1')", mark]},
        "remediation": {"allow": ["free_port"], "verify_timeout": 10}})
    steps = await run(config, "free_port")
    assert squatter.wait(5) is not None
    assert f"held by pid {squatter.pid}" in messages(steps)
    assert messages(steps).splitlines()[-1].startswith("verified: 1 processes")


async def test_signal_reaches_the_top_process(run: Any, children: Children, python: str, tmp_path: Path) -> None:
    mark, flag = marker(), tmp_path / "hup"
    script = (f"import signal, time, pathlib\nsignal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(flag)!r})"
              ".write_text('reloaded'))\nwhile True: time.sleep(0.1)\n")
    children.start([python, "-c", script, mark])
    config = config_for(tmp_path, {"match": {"cmdline": f"{mark}$"},
                                   "remediation": {"allow": ["signal"], "signal": {"signal": "HUP"}}})
    wait_for(lambda: procs_of(config), 5)
    time.sleep(0.3)
    await run(config, "signal")
    wait_for(flag.exists, 5, what="SIGHUP handled")


async def test_restart_through_supervisord(run: Any, tmp_path: Path, python: str) -> None:
    supervisord = require_binary("supervisord")
    require_binary("supervisorctl")
    mark = marker()
    sock = tmp_path / "supervisor.sock"
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"""[unix_http_server]
file={sock}
[supervisord]
logfile={tmp_path}/supervisord.log
pidfile={tmp_path}/supervisord.pid
nodaemon=true
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{sock}
[program:worker]
command={python} -c "import time; time.sleep(600)" {mark}
startsecs=0
stopwaitsecs=2
""")
    daemon = subprocess.Popen([supervisord, "-c", str(conf)], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        config = config_for(tmp_path, {"match": {"cmdline": f"{mark}$"},
                                       "start": {"supervisor": {"program": "worker", "config": str(conf)}},
                                       "remediation": {"allow": ["restart"], "verify_timeout": 10}})
        wait_for(lambda: len(procs_of(config)) == 1, 15, what="supervisord to start the program")
        (before,) = procs_of(config)
        steps = await run(config, "restart")
        (after,) = procs_of(config)
        assert after.pid != before.pid and after.ppid == daemon.pid
        assert "supervisorctl -c" in messages(steps) and "restart worker: exit status 0" in messages(steps)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(15)


async def test_restart_through_systemd_calls_systemctl(run: Any, tmp_path: Path, children: Children, python: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd cannot run here (it is not PID 1): a stand-in systemctl records its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    mark = marker()
    children.start([python, "-c", SLEEPER, mark])
    config = config_for(tmp_path, {"match": {"cmdline": f"{mark}$"}, "start": {"systemd_unit": "app@1.service"},
                                   "remediation": {"allow": ["restart"], "verify_timeout": 5}})
    wait_for(lambda: procs_of(config), 5)
    await run(config, "restart")
    assert calls.read_text() == "restart app@1.service\n"


@pytest.mark.parametrize("user", [None, "nobody"])
async def test_evidence_of_a_frozen_python_process(run: Any, tmp_path: Path, python: str, user: str | None) -> None:
    if user is not None and os.geteuid() != 0:
        pytest.skip("starting a service as another user needs root (CI runs as root)")
    if user is not None:
        tmp_path.chmod(0o755)  # the service's user must reach its cwd
    mark = marker()
    log = tmp_path / "app.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    start: dict[str, Any] = {"argv": [python, "-c", SLEEPER, mark], **({"user": user} if user else {})}
    config = config_for(tmp_path, {
        "match": {"cmdline": f"{mark}$"}, "start": start,
        "logs": [{"path": "app.log"}], "stop": {"grace_period": 0.5},
        "remediation": {"allow": ["restart"], "verify_timeout": 10}},
        evidence={"log_lines": 5, "max_bytes": 10**6})
    from receiver.process import start_service
    child = start_service(config, "svc")
    wait_for(lambda: procs_of(config), 5)
    if user is not None:  # really another user's process (once setpriv has exec'd it, same pid)
        def uid() -> str:
            line = next(x for x in Path(f"/proc/{child.pid}/status").read_text().splitlines() if x.startswith("Uid:"))
            return line.split()[1]
        wait_for(lambda: uid() == str(pwd.getpwnam(user).pw_uid), 5, what=f"the service to run as {user}")
    time.sleep(0.5)  # let the interpreter reach the script's loop before freezing it
    os.kill(child.pid, signal.SIGSTOP)
    wait_for(lambda: procs_of(config)[0].state == "T", 5)
    steps = await run(config, "restart")
    child.wait(5)
    path = next(s["evidence"] for s in steps.steps if "evidence" in s)
    evidence = json.loads(Path(path).read_text())
    (proc,) = evidence["processes"]
    assert (proc["pid"], proc["state"]) == (child.pid, "T")
    assert proc["wchan"] and proc["cmdline"].endswith(mark)
    assert evidence["logs"][str(log)] == [f"line {i}" for i in range(95, 100)]
    assert "<module> (<string>:2)" in evidence["py_spy"][str(child.pid)]  # where the frozen process was


async def test_evidence_has_the_stacks_of_a_python_process_whatever_its_name(tmp_path: Path, children: Children,
                                                                            python: str) -> None:
    """gunicorn, uvicorn and celery run as python3.x, named (comm) after their script:
    py-spy is chosen by the executable. prctl(PR_SET_NAME) names this one gunicorn."""
    script = ("import ctypes, time\nctypes.CDLL(None).prctl(15, b'gunicorn', 0, 0, 0)\n"
              "while True: time.sleep(1)\n")
    named = children.start([python, "-c", script, marker()])
    other = children.start(["sleep", "60"])
    wait_for(lambda: Path(f"/proc/{named.pid}/comm").read_text() == "gunicorn\n", 5, what="the new name")
    reader = ProcReader()
    procs = [reader.stat(named.pid), reader.stat(other.pid)]
    assert [p.comm for p in procs if p is not None] == ["gunicorn", "sleep"]
    steps = StepLog()
    await EvidenceKeeper(config_for(tmp_path, {"match": {"comm": "x"}}), tmp_path / "ev", reader)(
        "svc", [p for p in procs if p is not None], steps)
    evidence = json.loads(Path(steps.steps[-1]["evidence"]).read_text())
    assert set(evidence["py_spy"]) == {str(named.pid)}  # not sleep: no Python there
    assert "<module> (<string>:3)" in evidence["py_spy"][str(named.pid)]


def test_evidence_directory_is_bounded(tmp_path: Path) -> None:
    config = config_for(tmp_path, {"match": {"comm": "x"}}, evidence={"max_bytes": 3000})
    keeper = EvidenceKeeper(config, tmp_path / "ev", ProcReader())
    for i in range(10):
        keeper._write("svc", {"i": i, "pad": "x" * 1000})
    total = sum(f.stat().st_size for f in (tmp_path / "ev").glob("*.json"))
    assert total <= 3000 and len(list((tmp_path / "ev").glob("*.json"))) >= 1


# --- files -----------------------------------------------------------------------------------

async def test_rotate_logs_renames_reopens_and_compresses(run: Any, children: Children, python: str,
                                                          tmp_path: Path) -> None:
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
    config = config_for(tmp_path, {"match": {"cmdline": f"{mark}$"}, "logs": [{"path": "w.log"}],
                                   "remediation": {"allow": ["rotate_logs"],
                                                   "rotate_logs": {"keep": 2, "reopen_signal": "SIGHUP"}}})
    wait_for(lambda: log.exists() and log.stat().st_size > 100, 5)
    for _ in range(3):
        steps = messages(await run(config, "rotate_logs"))
        assert "renamed to w.log.1" in steps and "SIGHUP" in steps, steps
        wait_for(lambda: log.stat().st_size > 0, 5)  # the writer reopened the new file
    names = sorted(p.name for p in tmp_path.glob("w.log*"))
    assert names == ["w.log", "w.log.1", "w.log.2.gz"]
    lines = [int(x.split()[1]) for x in gzip.open(tmp_path / "w.log.2.gz", "rt").read().split("\n") if x]
    assert lines == sorted(lines)


async def test_rotate_logs_copytruncate(run: Any, tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("a\nb\n")
    config = config_for(tmp_path, {"match": {"comm": "^none$"}, "logs": [{"path": "c.log"}],
                                   "remediation": {"allow": ["rotate_logs"],
                                                   "rotate_logs": {"copytruncate": True, "keep": 3}}})
    inode = log.stat().st_ino
    await run(config, "rotate_logs")
    assert log.stat().st_ino == inode and log.read_text() == ""
    assert (tmp_path / "c.log.1").read_text() == "a\nb\n"


async def test_clean_deletes_old_matches_only_inside_and_never_through_symlinks(run: Any, tmp_path: Path) -> None:
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
    config = config_for(tmp_path, {"match": {"comm": "^none$"}, "remediation": {
        "allow": ["clean"], "clean": [{"directory": "cache", "glob": "*.tmp", "older_than": "1d"}]}})
    steps = await run(config, "clean")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink()) == [
        "cache/keep.dat", "cache/link", "cache/link.tmp", "cache/new.tmp", "outside/victim.tmp"]
    assert steps.steps[-1]["bytes_freed"] == 150


async def test_ensure_paths(run: Any, tmp_path: Path) -> None:
    (tmp_path / "wrong").mkdir(mode=0o777)
    os.chmod(tmp_path / "wrong", 0o777)
    config = config_for(tmp_path, {"match": {"comm": "^none$"},
                                   "directories": [{"path": "a/b", "mode": "0750"}, {"path": "wrong", "mode": "0700"}],
                                   "remediation": {"allow": ["ensure_paths"]}})
    await run(config, "ensure_paths")
    assert (tmp_path / "a/b").is_dir() and (tmp_path / "a/b").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "wrong").stat().st_mode & 0o777 == 0o700


async def test_restore_file_from_the_newest_valid_backup(run: Any, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    config = config_for(tmp_path, {"match": {"comm": "^none$"},
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
    steps = await run(config, "restore_file")
    assert json.loads(state.read_text()) == {"version": 3}
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert aside.read_text() == '{"version": 4, "half-writ'
    assert "restored the backup" in messages(steps)


async def test_restore_file_default_or_fail(run: Any, tmp_path: Path) -> None:
    (tmp_path / "default.json").write_text('{"fresh": true}')
    (tmp_path / "a.json").write_text("{broken")
    config = config_for(tmp_path, {"match": {"comm": "^none$"},
                                   "files": [{"path": "a.json", "format": "json", "default": "default.json"}],
                                   "remediation": {"allow": ["restore_file"]}})
    await run(config, "restore_file")
    assert json.loads((tmp_path / "a.json").read_text()) == {"fresh": True}
    (tmp_path / "b.yml").write_text("a: [unclosed")
    config = config_for(tmp_path, {"match": {"comm": "^none$"}, "files": [{"path": "b.yml", "format": "yaml"}],
                                   "remediation": {"allow": ["restore_file"]}})
    with pytest.raises(RepairFailed, match="no valid backup and no default"):
        await run(config, "restore_file")
    assert list(tmp_path.glob("b.yml.corrupt-*"))  # the corrupt copy is kept, nothing is lost


# --- database, endpoint, command ------------------------------------------------------------

async def test_vacuum_on_a_real_postgres(run: Any, postgres_server: Postgres, tmp_path: Path) -> None:
    import asyncpg
    (tmp_path / "pw").write_text(postgres_server.password)
    conn = await asyncpg.connect(host="127.0.0.1", port=postgres_server.port, user="postgres",
                                 password=postgres_server.password, ssl="disable")
    await conn.execute("CREATE TABLE IF NOT EXISTS events (id serial PRIMARY KEY, body text)")
    await conn.execute("INSERT INTO events (body) SELECT 'x' FROM generate_series(1, 1000)")
    await conn.execute("DELETE FROM events WHERE id % 2 = 0")
    base = {"port": postgres_server.port, "password": {"file": "pw"}, "tls": "disable"}
    config = config_for(tmp_path, {"match": {"comm": "^none$"}, "remediation": {
        "allow": ["vacuum"], "vacuum": {**base, "tables": ["public.events"], "statement_timeout": "30s"}}})
    steps = await run(config, "vacuum")
    assert 'VACUUM (ANALYZE) public.events took' in messages(steps)
    analyzed = await conn.fetchval("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'events'")
    await conn.close()
    assert analyzed is not None
    config = config_for(tmp_path, {"match": {"comm": "^none$"}, "remediation": {
        "allow": ["vacuum"], "vacuum": {**base, "tables": ["no_such_table"]}}})
    with pytest.raises(RepairFailed, match="no_such_table"):
        await run(config, "vacuum")


async def test_http_action(run: Any, tmp_path: Path) -> None:
    calls: list[str] = []

    async def reset(request: web.Request) -> web.Response:
        calls.append(request.method)
        return web.Response(status=204 if request.path == "/reset" else 500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reset)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for path, ok in (("/reset", True), ("/broken", False)):
            config = config_for(tmp_path, {"match": {"comm": "^none$"}, "remediation": {
                "allow": ["http"], "http": {"url": f"http://127.0.0.1:{port}{path}"}}})
            if ok:
                await run(config, "http")
            else:
                with pytest.raises(RepairFailed, match="answered 500"):
                    await run(config, "http")
    finally:
        await runner.cleanup()
    assert calls == ["POST", "POST"]


async def test_exec_fills_declared_placeholders_only_as_whole_argv_items(run: Any, tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    script = f"import json, sys; json.dump(sys.argv[1:], open({str(out)!r}, 'w'))"
    config = config_for(tmp_path, {"match": {"comm": "^none$"}, "remediation": {"allow": ["exec"], "exec": {
        "argv": [sys.executable, "-c", script, "--conversation", "{conversation}"],
        "labels": {"conversation": "[a-z0-9-]{1,36}"}}}})
    await run(config, "exec", {"conversation": "abc-123", "other": "x"})
    assert json.loads(out.read_text()) == ["--conversation", "abc-123"]
    canary = tmp_path / "pwned"
    for labels in ({"conversation": f"abc; touch {canary}"}, {"conversation": "$(id)"}, {}):
        with pytest.raises(RepairFailed):
            await run(config, "exec", labels)
    assert not canary.exists()


def test_exec_placeholders_must_be_declared_and_whole() -> None:
    from exporter.config import ConfigError
    for argv, labels in ((["x", "{a}"], {}), (["x", "--id={a}"], {"a": ".*"})):
        with pytest.raises(ConfigError):
            parse_config({"services": {"s": {"match": {"comm": "x"}, "remediation": {
                "allow": ["exec"], "exec": {"argv": argv, "labels": labels}}}}})
