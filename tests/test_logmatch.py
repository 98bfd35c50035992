"""Log line matching: what counts, under which engine, and the default pack on real lines."""

from __future__ import annotations

import logging
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.logtail import DEFAULT_PATTERNS, LineMatcher, LogFollower, Pattern, matcher_for


def patterns(**regexes: str) -> list[Pattern]:
    return [Pattern(name, re.compile(regex), "error") for name, regex in regexes.items()]


def count(matcher: LineMatcher, *lines: bytes) -> Counter[str]:
    counts: Counter[str] = Counter()
    matcher.count(b"\n".join(lines), counts)
    return counts


def reference(pats: list[Pattern], lines: list[bytes]) -> Counter[str]:
    """The algorithm before RE2: every pattern searched in every decoded line."""
    counts: Counter[str] = Counter()
    for raw in lines:
        text = raw.decode("utf-8", "replace")
        for p in pats:
            if p.regex.search(text):
                counts[p.name] += 1
    return counts


DEFAULT = [Pattern(name, re.compile(regex), sev) for name, (regex, sev) in DEFAULT_PATTERNS.items()]


def test_a_line_counts_once_for_each_pattern_it_matches() -> None:
    m = LineMatcher(patterns(boom=r"BOOM", error=r"(?i)error", digits=r"\d+"))
    assert count(m, b"BOOM BOOM error 12 ERROR 34", b"nothing here", b"BOOM") == {"boom": 2, "error": 1, "digits": 1}


def test_flags_stay_with_their_pattern() -> None:
    m = LineMatcher(patterns(any_case=r"(?i)warn", exact=r"Error", dotall=r"(?s)a.b"))
    assert count(m, b"WARN", b"error", b"Error", b"a-b") == {"any_case": 1, "exact": 1, "dotall": 1}
    assert count(m, b"a", b"b") == {}  # (?s) never joins two lines


def test_anchors_are_per_line() -> None:
    m = LineMatcher(patterns(starts=r"^Traceback", ends=r"failed$", whole=r"\Aok\Z", begins=r"\Aok"))
    assert m.slow == {"whole": m.slow["whole"]} and "RE2" in m.slow["whole"]  # \Z: re only
    lines = [b"Traceback (most recent call last):", b"  x Traceback", b"it failed", b"failed twice",
             b"ok", b"ok then"]
    assert count(m, *lines) == {"starts": 1, "ends": 1, "whole": 1, "begins": 2}


def test_a_match_across_lines_counts_nothing_and_hides_nothing() -> None:
    # the block-wide scan can run from one line into the next; only a line's own match counts
    m = LineMatcher(patterns(pair=r"end\s+start", start=r"start", status=r'"\s5\d\d\s'))
    assert count(m, b"the end", b"start here", b'"GET /" 500', b" next") == {"start": 1}


def test_patterns_re2_cannot_take_run_under_re() -> None:
    with pytest.warns(FutureWarning, match="nested set"):  # re's own warning for [[:
        pats = patterns(lookahead=r"user(?!name)", backref=r"(\w+) \1", posix=r"[[:digit:]]", upto=r"x{,2}y",
                        plain=r"plain")
    m = LineMatcher(pats)
    assert set(m.slow) == {"lookahead", "backref", "posix", "upto"}
    lines = [b"user=1", b"username=2", b"the the", b"the cat", b"[:]", b"d", b"7", b"xxy", b"y", b"plain"]
    assert count(m, *lines) == reference(pats, lines)
    # re's meanings: [[:digit:]] is one of "[:digt" then "]"; x{,2}y is x{0,2}y
    assert count(m, *lines) == {"lookahead": 1, "backref": 1, "posix": 1, "upto": 2, "plain": 1}


def test_a_follower_says_which_patterns_run_under_re(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "exporter.logtail"):
        LogFollower(tmp_path / "app.log", patterns(slow=r"(?<=a)b", fast=r"b")).close()
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'app.log'}: log pattern slow runs under Python's re, line by line (RE2 cannot take it: invalid "
        "perl operator: (?<=): slower, and a pattern that backtracks badly can stall reading this log"]


def test_invalid_utf8_reads_as_replacement_characters() -> None:
    m = LineMatcher(patterns(dot=r"a.b", not_space=r"x\Sy"))
    assert count(m, b"a\xffb", b"x\xc3y", b"a\xc3\xa9b") == {"dot": 2, "not_space": 1}


def test_an_empty_line_is_a_line() -> None:
    m = LineMatcher(patterns(empty=r"^$"))
    assert count(m, b"", b"x", b"") == {"empty": 2}


def test_the_default_pack_runs_entirely_under_re2() -> None:
    assert LineMatcher(DEFAULT).slow == {}


def test_followers_with_the_same_patterns_share_one_matcher(tmp_path: Path) -> None:
    a, b = LogFollower(tmp_path / "a.log", DEFAULT), LogFollower(tmp_path / "b.log", list(DEFAULT))
    assert a.matcher is b.matcher is matcher_for(tuple(DEFAULT))


# ASCII and invalid bytes: where RE2 and re agree by definition (RE2's \w, \d, \s, \b are
# ASCII-only, re's Unicode-aware, so "é" next to a word would differ, as documented).
FRAGMENTS = ["Traceback (most recent call last):", '"GET / HTTP/1.1" 500 12', "HTTP/2 503", " 502 ", "5001",
             "MemoryError", "OutOfMemoryError", "Out of memory: Killed process 12", "ERROR:  out of memory",
             "Perhaps out of memory?", "Worker (pid:3) was sent SIGKILL!", "was sent SIGTERM!", "permission DENIED",
             "EACCES", "No space left on device", "ENOSPC", "Address already in use", "JSONDecodeError",
             "Expecting value: line 1 column 2", "Unexpected token < in JSON", "Error 111 connecting to h:6379",
             "redis.exceptions.TimeoutError", "x509: certificate", "CERTIFICATE VERIFY FAILED", "OperationalError",
             "FATAL:  too many connections", "connection to server at x failed", "OOM command not allowed", " ", "\t",
             "\r", "a", "_", "1", "\xff", "\xc3", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(FRAGMENTS), max_size=6), max_size=12))
def test_default_pack_counts_equal_the_line_by_line_re_algorithm(lines: list[list[str]]) -> None:
    raw = [b"".join(f.encode("latin-1") if f in ("\xff", "\xc3") else f.encode() for f in line) for line in lines
           if "é" not in line]
    if not raw:
        return
    assert count(LineMatcher(DEFAULT), *raw) == reference(DEFAULT, raw)


# --- the default pack on real lines ---------------------------------------------------------
# Formats from the projects' sources: gunicorn/arbiter.py (reap_workers), the kernel's
# mm/oom_kill.c (since 5.1 "Killed process", before "Kill process ... or sacrifice child",
# and the memory cgroup's), PostgreSQL's ereport(ERROR, errmsg("out of memory")), Redis's
# shared.oomerr reply as redis-py raises it, asyncpg's and psycopg2's exception names.

REAL_LINES = [
    ("[2026-11-22 03:00:53 +0000] [3] [ERROR] Worker (pid:16) was sent SIGKILL! Perhaps out of memory?",
     {"worker_killed"}),
    ("[2026-11-22 03:00:53 +0000] [3] [WARNING] Worker (pid:17) was sent SIGSEGV!", {"worker_killed"}),
    ("[2026-11-22 03:00:53 +0000] [3] [INFO] Worker (pid:18) was sent SIGTERM!", set()),
    ("[2026-11-22 03:00:52 +0000] [3] [CRITICAL] WORKER TIMEOUT (pid:16)", set()),
    ("Nov 22 03:00:53 web1 kernel: Out of memory: Killed process 4182 (gunicorn) total-vm:812044kB, "
     "anon-rss:518420kB, file-rss:1240kB, shmem-rss:0kB, UID:1000 pgtables:1234kB oom_score_adj:0",
     {"out_of_memory"}),
    ("[18492.104] Memory cgroup out of memory: Killed process 4182 (order-worker) total-vm:812044kB, "
     "anon-rss:518420kB, file-rss:1240kB, shmem-rss:0kB", {"out_of_memory"}),
    ("[ 1171.795] Out of memory: Kill process 1669 (python3) score 900 or sacrifice child", {"out_of_memory"}),
    ("[ 1171.795] Killed process 1669 (python3) total-vm:105068kB, anon-rss:9792kB, file-rss:10972kB", set()),
    ("[ 1172.339] python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0", set()),
    ("[18492.105] oom_reaper: reaped process 4182 (order-worker), now anon-rss:0kB", set()),
    ("MemoryError", {"out_of_memory"}),
    ("2026-11-22 03:00:53.123 UTC [4242] ERROR:  out of memory", {"out_of_memory"}),
    ('2026-11-22 03:00:53.123 UTC [4242] DETAIL:  Failed on request of size 8192 in memory context "ExecutorState".',
     set()),
    ("asyncpg.exceptions.OutOfMemoryError: out of memory", {"out_of_memory"}),
    ("psycopg2.errors.OutOfMemory: out of memory", {"out_of_memory"}),
    ("redis.exceptions.OutOfMemoryError: OOM command not allowed when used memory > 'maxmemory'.",
     {"out_of_memory"}),
    ("OSError: [Errno 12] Cannot allocate memory", {"out_of_memory"}),
    ("2026-11-22 03:00:53,120 INFO cache: evicted 12 keys, memory ok", set()),
]


@pytest.mark.parametrize(("line", "expected"), REAL_LINES, ids=[line[:60] for line, _ in REAL_LINES])
def test_default_pack_on_real_lines(line: str, expected: set[str]) -> None:
    assert set(count(LineMatcher(DEFAULT), line.encode())) == expected
    assert set(reference(DEFAULT, [line.encode()])) == expected


# --- the follower's lines: partial lines, runaway lines ------------------------------------

def test_a_runaway_line_counts_as_a_line(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    f = LogFollower(log, patterns(boom=r"BOOM"))
    f.poll()
    with open(log, "a") as out:
        out.write("BOOM " + "x" * 70_000)  # over MAX_LINE, no newline yet
    assert (f.poll(), f.lines) == ({"boom": 1}, 1)
    with open(log, "a") as out:
        out.write("\nBOOM\nBO")
    assert (f.poll(), f.lines) == ({"boom": 1}, 3)  # the rest of the runaway line (empty), then BOOM
    f.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["BOOM", "boom", "x", " ", "\n", "\n\n", "Traceback (most recent call last):\n",
                                 "OSError: [Errno 28] No space left on device", "\xe9"]), max_size=40),
       st.lists(st.integers(1, 30), min_size=1, max_size=10))
def test_counts_do_not_depend_on_how_the_writes_are_cut(pieces: list[str], cuts: list[int]) -> None:
    data = "".join(pieces).encode()
    pats = [*patterns(boom=r"BOOM"), *DEFAULT]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "app.log"
        log.write_bytes(b"")
        f = LogFollower(log, pats)
        f.poll()
        total: Counter[str] = Counter()
        at, i = 0, 0
        while at < len(data):
            step = cuts[i % len(cuts)]
            with open(log, "ab") as out:
                out.write(data[at:at + step])
            at, i = at + step, i + 1
            total.update(f.poll())
        f.close()
    whole = data.split(b"\n")[:-1]  # the lines that got their newline
    assert (total, f.lines) == (reference(pats, whole), len(whole))
