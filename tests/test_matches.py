"""Why a process is a service's: the rules it met (``explain``) and ``--processes``."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from exporter.procfs import ProcessTable, ProcReader, explain

from .helpers import CLK_TCK, PAGE, REPO, Children, FakeProc, build_config, started_ticks_ago, wait_for


def explained(fake: FakeProc, services: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    config = build_config(tmp_path, services)
    table = ProcessTable(ProcReader(fake.root, CLK_TCK, PAGE), config.services)
    return explain(table, table.scan())


def test_each_rule_met_with_what_the_regex_matched(fake_proc: FakeProc, tmp_path: Path) -> None:
    fake_proc.add(10, comm="redis-server", cmdline=["redis-server", "127.0.0.1:6379"], exe="/usr/bin/redis-server")
    pidfile = tmp_path / "redis.pid"
    pidfile.write_text("10\n")
    (e,) = explained(fake_proc, {"redis": {"match": {"comm": "^redis-server$", "cmdline": r":6379\b",
                                                     "exe": "redis", "pidfile": str(pidfile)}}}, tmp_path)["redis"]
    rules = {r.rule: r for r in e.rules}
    assert (rules["comm"].matched, rules["comm"].span) == ("redis-server", (0, 12))
    assert (rules["cmdline"].matched, rules["cmdline"].span) == (":6379", (22, 27))
    assert (rules["exe"].matched, rules["exe"].span) == ("redis", (9, 14))
    assert not rules["pidfile"].selects  # beside regexes it only marks the copy stop_duplicates keeps
    assert str(rules["cmdline"]) == r"cmdline=~':6379\b' matched ':6379' at 22-27"
    assert str(rules["pidfile"]) == f"named by pidfile {pidfile} (kept first by stop_duplicates)"
    assert e.exe == "/usr/bin/redis-server" and e.hints == ()


def test_a_loose_cmdline_regex_matching_another_program_gets_a_hint(fake_proc: FakeProc, tmp_path: Path) -> None:
    fake_proc.add(20, comm="python3", cmdline=["python3", "ledger.py"], exe="/usr/bin/python3.11", start_ticks=100)
    fake_proc.add(21, comm="vim", cmdline=["vim", "ledger.py"], exe="/usr/bin/vim.basic", start_ticks=50)
    fake_proc.add(22, comm="python3", cmdline=["python3", "report.py", "--from", "ledger.py"],
                  exe="/usr/bin/python3.11", start_ticks=200)
    found = explained(fake_proc, {
        "ledger": {"match": {"cmdline": r"ledger\.py"}, "start": {"argv": ["python3", "ledger.py"]}},
        "unstarted": {"match": {"cmdline": r"ledger\.py"}},  # the program is the most common comm
        "pinned": {"match": {"comm": "^python3$", "cmdline": r"ledger\.py"}},
    }, tmp_path)
    hints = {e.process.pid: e.hints for e in found["ledger"]}
    assert hints[20] == () and hints[22] == ()  # the same program: the view cannot tell, the cmdline shows it
    assert len(hints[21]) == 1 and "comm 'vim' is not the service's program (python3)" in hints[21][0]
    assert {e.process.pid: bool(e.hints) for e in found["unstarted"]} == {20: False, 21: True, 22: False}
    assert [e.process.pid for e in found["pinned"]] == [20, 22]
    assert not any(e.hints for e in found["pinned"])  # comm is part of the match: no cmdline-only match


def test_the_receivers_start_wrapper_is_named_not_suspected(fake_proc: FakeProc, tmp_path: Path) -> None:
    # The receiver starts `prlimit -- setpriv -- python3 ledger.py`; for a moment the pid is setpriv's.
    fake_proc.add(30, comm="setpriv", cmdline=["setpriv", "--reuid=1000", "--", "python3", "ledger.py"],
                  exe="/usr/bin/setpriv")
    (e,) = explained(fake_proc, {"ledger": {"match": {"cmdline": r"ledger\.py"},
                                            "start": {"argv": ["python3", "ledger.py"]}}}, tmp_path)["ledger"]
    assert len(e.hints) == 1 and e.hints[0].startswith("setpriv is the receiver's start wrapper")


def test_processes_view_shows_what_matched_and_what_stop_duplicates_keeps(tmp_path: Path, children: Children,
                                                                          python: str) -> None:
    marker = f"ledger-{uuid.uuid4().hex[:8]}.py"
    (tmp_path / marker).write_text("import time\nwhile True: time.sleep(1)\n")
    service = children.start([python, marker], cwd=tmp_path)
    wait_for(lambda: started_ticks_ago(service.pid) > 0, 5, what="a later start time: the service is the oldest")
    bystander = children.start(["sh", "-c", "sleep 60; exit 0", marker])  # a script that mentions the name
    wait_for(lambda: Path(f"/proc/{bystander.pid}/cmdline").read_bytes().endswith(marker.encode() + b"\0"), 5)
    path = tmp_path / "caretaker.yml"
    path.write_text(json.dumps({"services": {"ledger": {
        "match": {"cmdline": marker.replace(".", r"\.")}, "start": {"argv": [python, marker]},
        "remediation": {"allow": ["restart", "stop_duplicates"]}}}}))
    table = subprocess.run([sys.executable, "-m", "exporter.app", "--config", str(path), "--processes"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("ledger: 2 processes (expected 1); match cmdline=~")
    assert f"matched '{marker}'" in table.stdout
    assert f"stop_duplicates would keep {service.pid} and stop {bystander.pid}" in table.stdout
    as_json = subprocess.run([sys.executable, "-m", "exporter.app", "--config", str(path), "--processes", "--json"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    (ledger,) = json.loads(as_json.stdout)["services"]
    procs = {p["pid"]: p for p in ledger["processes"]}
    assert procs[service.pid]["hints"] == [] and procs[service.pid]["rules"][0]["matched"] == marker
    assert procs[bystander.pid]["comm"] == "sh" and "comm 'sh' is not" in procs[bystander.pid]["hints"][0]
    assert ledger["stop_duplicates"] == {"keep": [service.pid], "stop": [bystander.pid]}
