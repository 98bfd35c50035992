"""Process discovery and accounting, against a fake /proc tree and real processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from exporter.config import parse_config
from exporter.procfs import CpuAccountant, ProcessTable, ProcReader, scan_services

from .helpers import BTIME, CLK_TCK, PAGE, Children, FakeProc, MakeConfig, free_port, wait_for


def services(**matches: dict[str, str]) -> dict:  # type: ignore[type-arg]
    """Validated ``services`` entries of these matches, for a scan (no config directory needed)."""
    config = parse_config({"services": {name: {"match": m, "processes": {"min": 0, "max": 10}}
                                        for name, m in matches.items()}})
    return dict(config.services)


def reader(fake: FakeProc) -> ProcReader:
    return ProcReader(fake.root, clock_ticks=CLK_TCK, page_size=PAGE)


def test_matches_by_comm_cmdline_and_exe(fake_proc: FakeProc) -> None:
    fake_proc.add(10, comm="redis-server", cmdline=["redis-server 127.0.0.1:6379"], exe="/usr/bin/redis-server")
    fake_proc.add(11, comm="redis-server", cmdline=["redis-server 127.0.0.1:6380"], exe="/usr/bin/redis-server")
    fake_proc.add(12, comm="python3", cmdline=["python3", "app.py", "--port", "8000"], exe="/usr/bin/python3.11")
    fake_proc.add(13, comm="bash", cmdline=["bash"], exe="/usr/bin/bash")
    found = scan_services(reader(fake_proc), services(
        redis={"comm": "^redis-server$", "cmdline": r":6379\b"},
        app={"cmdline": r"app\.py --port 8000"},
        pythons={"exe": r"/python3(\.\d+)?$"},
    ))
    assert [p.pid for p in found["redis"]] == [10]
    assert [p.pid for p in found["app"]] == [12]
    assert [p.pid for p in found["pythons"]] == [12]
    assert found["app"][0].cmdline == "python3 app.py --port 8000"


def test_facts_are_in_base_units(fake_proc: FakeProc) -> None:
    fake_proc.add(20, comm="worker", start_ticks=500, utime=150, stime=50, rss_pages=3, fds=4, threads=5)
    (p,) = scan_services(reader(fake_proc), services(w={"comm": "worker"}))["w"]
    assert p.start_time_seconds == BTIME + 5.0
    assert p.cpu_seconds == 2.0
    assert p.rss_bytes == 3 * PAGE
    assert p.open_fds == 4
    assert p.num_threads == 5


def test_zombies_kernel_threads_and_excluded_pids_never_match(fake_proc: FakeProc) -> None:
    fake_proc.add(30, comm="worker", state="Z")
    fake_proc.add(31, comm="worker", flags=0x00200000)  # PF_KTHREAD
    fake_proc.add(32, comm="worker")
    fake_proc.add(33, comm="worker", state="T")  # stopped (frozen) still counts
    found = scan_services(reader(fake_proc), services(w={"comm": "worker"}), exclude_pids=[32])
    assert [(p.pid, p.state) for p in found["w"]] == [(33, "T")]


def test_comm_with_spaces_and_parentheses(fake_proc: FakeProc) -> None:
    fake_proc.add(40, comm="a (b) c")
    (p,) = scan_services(reader(fake_proc), services(w={"comm": r"^a \(b\) c$"}))["w"]
    assert p.comm == "a (b) c"


def test_every_service_is_a_key_even_without_processes(fake_proc: FakeProc) -> None:
    found = scan_services(reader(fake_proc), services(a={"comm": "x"}, b={"comm": "y"}))
    assert found == {"a": [], "b": []}


def test_process_vanishing_mid_scan_is_not_an_error(fake_proc: FakeProc) -> None:
    fake_proc.add(50, comm="worker")
    fake_proc.add(51, comm="worker")

    class Vanishing(ProcReader):
        def listing(self) -> list[tuple[str, int]]:
            pids = super().listing()
            fake_proc.remove(50)  # gone between listing and reading
            return pids

    found = scan_services(Vanishing(fake_proc.root, CLK_TCK, PAGE), services(w={"comm": "worker"}))
    assert [p.pid for p in found["w"]] == [51]


def test_processes_sorted_oldest_first(fake_proc: FakeProc) -> None:
    fake_proc.add(60, comm="w", start_ticks=300)
    fake_proc.add(61, comm="w", start_ticks=100)
    fake_proc.add(62, comm="w", start_ticks=200)
    assert [p.pid for p in scan_services(reader(fake_proc), services(w={"comm": "^w$"}))["w"]] == [61, 62, 60]


def test_cpu_counter_never_goes_backwards_when_processes_come_and_go(fake_proc: FakeProc) -> None:
    acct = CpuAccountant()
    r = reader(fake_proc)
    svc = services(w={"comm": "^w$"})
    fake_proc.add(70, comm="w", start_ticks=100, utime=100)  # 1.0s
    fake_proc.add(71, comm="w", start_ticks=100, utime=200)  # 2.0s
    assert acct.update("w", scan_services(r, svc)["w"]) == 3.0
    fake_proc.add(70, comm="w", start_ticks=100, utime=150)  # +0.5s
    fake_proc.remove(71)  # exits: its 2.0s stay counted
    assert acct.update("w", scan_services(r, svc)["w"]) == 3.5
    # pid 70 is reused by a new process (other start time) with less CPU: a new process, not a reset
    fake_proc.add(70, comm="w", start_ticks=900, utime=10)
    assert acct.update("w", scan_services(r, svc)["w"]) == 3.6
    fake_proc.remove(70)
    assert acct.update("w", scan_services(r, svc)["w"]) == 3.6


def test_reused_pid_is_attributed_to_its_new_service(fake_proc: FakeProc) -> None:
    r = reader(fake_proc)
    svc = services(redis={"comm": "^redis-server$"}, app={"comm": "^uvicorn$"})
    fake_proc.add(80, comm="redis-server", start_ticks=100)
    assert [p.pid for p in scan_services(r, svc)["redis"]] == [80]
    fake_proc.add(80, comm="uvicorn", start_ticks=5000)
    found = scan_services(r, svc)
    assert found["redis"] == [] and [p.pid for p in found["app"]] == [80]


FORKS_THEN_EXECS = ("import os, sys, time\n"
                    "pid = os.fork()\n"
                    "if pid == 0:  # the child runs as a copy of its parent until the test says go\n"
                    "    while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
                    "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[2]])\n"
                    "time.sleep(60)\n")
"""``python -c FORKS_THEN_EXECS GO CHILD_MARKER PARENT_MARKER``: a parent whose forked child
execs into ``CHILD_MARKER`` once the file ``GO`` exists."""


def test_child_between_fork_and_exec_moves_to_its_new_service(children: Children, python: str,
                                                              tmp_path: Path) -> None:
    """A forked child first looks like its parent; after exec it must be the new program."""
    go = tmp_path / "exec-now"
    parent = children.start([python, "-c", FORKS_THEN_EXECS, str(go), "child-marker", "parent-marker"])
    svc = services(parent={"cmdline": "parent-marker$"}, child={"cmdline": "child-marker$"})
    r = ProcReader()
    wait_for(lambda: len(scan_services(r, svc)["parent"]) == 2, 5, what="forked child seen as parent")
    go.touch()
    wait_for(lambda: len(scan_services(r, svc)["child"]) == 1, 5, what="child seen after exec")
    found = scan_services(r, svc)
    assert [p.pid for p in found["parent"]] == [parent.pid]
    assert found["child"][0].ppid == parent.pid


def test_real_process_facts(children: Children, python: str) -> None:
    proc = children.start([python, "-c", "import time; x = bytearray(30_000_000); time.sleep(60)", "facts-marker"])
    svc = services(p={"cmdline": "facts-marker"})
    r = ProcReader()
    wait_for(lambda: scan_services(r, svc)["p"] and scan_services(r, svc)["p"][0].rss_bytes > 30_000_000, 10,
             what="process with 30 MB resident")
    (p,) = scan_services(r, svc)["p"]
    assert p.pid == proc.pid
    assert p.pgid == proc.pid  # own session and group
    assert abs(p.start_time_seconds - time.time()) < 30
    assert p.open_fds is not None and p.open_fds >= 3
    assert os.getpid() not in [q.pid for q in scan_services(r, services(me={"cmdline": "pytest"}), [os.getpid()])["me"]]


# --- ProcessTable: what a scan may skip, and what it must not -----------------------------

def table(fake: FakeProc, svc: dict, recheck_scans: int = 32) -> ProcessTable:  # type: ignore[type-arg]
    return ProcessTable(reader(fake), svc, recheck_scans=recheck_scans)


def test_unchanged_unmatched_processes_are_not_read_again(fake_proc: FakeProc) -> None:
    for pid in range(100, 150):
        fake_proc.add(pid, comm="idle")
    fake_proc.add(200, comm="worker")
    t = table(fake_proc, services(w={"comm": "^worker$"}))
    assert [p.pid for p in t.scan()["w"]] == [200]
    assert t.reads == 51
    assert [p.pid for p in t.scan()["w"]] == [200]
    assert t.reads == 1  # only the service's own process


def test_pid_reuse_is_seen_at_once(fake_proc: FakeProc) -> None:
    fake_proc.add(300, comm="idle")
    t = table(fake_proc, services(w={"comm": "^worker$"}))
    assert t.scan()["w"] == []
    fake_proc.add(300, comm="worker", start_ticks=5000)  # a new process with the same pid
    assert [p.pid for p in t.scan()["w"]] == [300]


def test_matched_process_changing_its_title_is_seen_at_once(fake_proc: FakeProc) -> None:
    fake_proc.add(400, comm="python3", cmdline=["python3", "app.py", "--port", "8000"])
    t = table(fake_proc, services(app={"cmdline": "app.py --port 8000"}, other={"cmdline": "renamed-title"}))
    assert [p.pid for p in t.scan()["app"]] == [400]
    fake_proc.set_cmdline(400, ["renamed-title"])
    found = t.scan()
    assert found["app"] == [] and [p.pid for p in found["other"]] == [400]


def test_old_process_that_execs_into_a_service_is_found_by_the_recheck(fake_proc: FakeProc) -> None:
    fake_proc.add(500, comm="wrapper")
    t = table(fake_proc, services(w={"comm": "^worker$"}), recheck_scans=4)
    t.scan()
    fake_proc.set_comm(500, "worker")  # exec: same pid, same /proc inode
    found_after = next((i for i in range(1, 10) if t.scan()["w"]), None)
    assert found_after is not None and found_after <= 8


def test_child_between_fork_and_exec_with_a_persistent_table(children: Children, python: str,
                                                              tmp_path: Path) -> None:
    go = tmp_path / "exec-now"
    parent = children.start([python, "-c", FORKS_THEN_EXECS, str(go), "child-mark", "parent-mark"])
    t = ProcessTable(ProcReader(), services(parent={"cmdline": "parent-mark$"}, child={"cmdline": "child-mark$"}),
                     exclude_pids=[os.getpid()])
    wait_for(lambda: len(t.scan()["parent"]) == 2, 5, what="forked child counted with its parent")
    go.touch()
    wait_for(lambda: len(t.scan()["child"]) == 1, 5, what="child counted as its own service after exec")
    found = t.scan()
    assert [p.pid for p in found["parent"]] == [parent.pid]


# --- pidfiles ---------------------------------------------------------------------------

def test_a_pidfile_alone_finds_the_process_it_names(children: Children, python: str, make_config: MakeConfig,
                                                     tmp_path: Path) -> None:
    sleeper = [python, "-c", "import time; time.sleep(60)", "pidfile-marker"]
    first, second = children.start(sleeper), children.start(sleeper)
    pidfile = tmp_path / "run" / "svc.pid"
    pidfile.parent.mkdir()
    config = make_config(service={"match": {"pidfile": "run/svc.pid"}})
    assert config.services["svc"].match.pidfile == str(pidfile)  # made absolute against the config's directory
    # A table that remembers old processes: the pidfile must still be followed at once.
    processes = ProcessTable(ProcReader(), config.services, young_seconds=0, recheck_scans=1000)

    def pids() -> list[int]:
        return [p.pid for p in processes.scan()["svc"]]

    assert pids() == []  # no pidfile yet
    pidfile.write_text(f"{first.pid}\n")
    assert pids() == [first.pid]
    pidfile.write_text(f"{second.pid}\n/var/lib/extra/lines/ignored\n")  # postmaster.pid has more lines
    assert pids() == [second.pid]
    for garbage in ("", "abc\n", "-5\n", "1\n"):  # nothing, not a pid, init
        pidfile.write_text(garbage)
        assert pids() == [], garbage
    # A pid reused after the service died belongs to a process younger than the file.
    pidfile.write_text(f"{second.pid}\n")
    old = time.time() - 3600
    os.utime(pidfile, (old, old))
    assert pids() == []
    second.kill()
    second.wait(5)
    pidfile.write_text(f"{second.pid}\n")
    assert pids() == []  # gone


def test_with_regexes_a_pidfile_does_not_hide_a_second_copy(children: Children, python: str,
                                                             make_config: MakeConfig, tmp_path: Path) -> None:
    sleeper = [python, "-c", "import time; time.sleep(60)", "both-marker"]
    first, second = children.start(sleeper), children.start(sleeper)
    (tmp_path / "svc.pid").write_text(f"{first.pid}\n")
    config = make_config(service={"match": {"cmdline": "both-marker$", "pidfile": "svc.pid"}})
    wait_for(lambda: len(scan_services(ProcReader(), config.services)["svc"]) == 2, 5, what="both copies")
    assert sorted(p.pid for p in scan_services(ProcReader(), config.services)["svc"]) == \
        sorted([first.pid, second.pid])


# --- listening ports ----------------------------------------------------------------------

SERVER = ("import os, socket, sys, time\n"
          "while sys.argv[2] != 'now' and not os.path.exists(sys.argv[2]): time.sleep(0.01)  # bind when told\n"
          "s = socket.socket(socket.AF_INET6 if sys.argv[3] == '6' else socket.AF_INET)\n"
          "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('::1' if sys.argv[3] == '6' else '127.0.0.1', int(sys.argv[1])))\n"
          "s.listen()\n"
          "if sys.argv[4] == 'fork':\n"
          "    os.fork()  # a worker sharing the listening socket\n"
          "time.sleep(60)\n")


def test_a_port_alone_finds_the_server_and_its_workers(children: Children, python: str) -> None:
    port = free_port()
    server = children.start([python, "-c", SERVER, str(port), "now", "4", "fork", "port-marker"])
    bystander = children.start([python, "-c", "import time; time.sleep(60)", "port-marker"])
    svc = services(web={"port": port})  # type: ignore[dict-item]
    wait_for(lambda: len(scan_services(ProcReader(), svc)["web"]) == 2, 5, what="server and worker")
    found = scan_services(ProcReader(), svc)["web"]
    assert found[0].pid == server.pid and found[1].ppid == server.pid
    assert bystander.pid not in [p.pid for p in found]


def test_an_old_process_that_binds_late_is_found(children: Children, python: str, tmp_path: Path) -> None:
    port, go = free_port(), tmp_path / "bind-now"
    late = children.start([python, "-c", SERVER, str(port), str(go), "6", "nofork", "late-marker"])
    svc = services(web={"port": port})  # type: ignore[dict-item]
    # young_seconds=0: the table treats every process as old and would not read it again
    # for a long while; only the search for an unaccounted socket can find it.
    processes = ProcessTable(ProcReader(), svc, young_seconds=0, recheck_scans=1000)
    assert processes.scan()["web"] == []
    go.touch()
    wait_for(lambda: [p.pid for p in processes.scan()["web"]] == [late.pid], 5, what="the late listener")
    assert [p.pid for p in processes.scan()["web"]] == [late.pid]  # matched: read every scan now
    late.kill()
    late.wait(5)
    assert processes.scan()["web"] == []


def test_port_and_pidfile_together_select_the_named_holder(children: Children, python: str,
                                                           make_config: MakeConfig, tmp_path: Path) -> None:
    port = free_port()
    server = children.start([python, "-c", SERVER, str(port), "now", "4", "fork", "both-sel-marker"])
    (tmp_path / "web.pid").write_text(f"{server.pid}\n")
    config = make_config({"web": {"match": {"port": port, "pidfile": "web.pid"}}})
    wait_for(lambda: [p.pid for p in scan_services(ProcReader(), config.services)["web"]] == [server.pid], 5,
             what="only the holder the pidfile names")
