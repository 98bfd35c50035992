"""Log pattern matching: the exporter's matcher against one ``re.search`` per pattern per line.

    .venv/bin/python bench/logs.py [--lines 100000] [--rounds 3] [--seed 1]

It writes a mixed log of the kinds caretaker follows (web access lines from nginx,
gunicorn and uvicorn, application lines, celery and gunicorn's own lines, PostgreSQL
and Redis server lines, tracebacks, a kernel OOM line now and then; about 5% of lines
match a pattern, a few carry non-ASCII text), then reads it from the start, in the same
process, with

- the algorithm the exporter had before (reimplemented here as the baseline): read in
  1 MiB chunks, split into lines, decode each, ``re.search`` every pattern in it;
- :class:`exporter.logtail.LogFollower` as the exporter runs it (RE2, one scan of each
  block for all patterns, then the lines it stops on).

Both use the default pattern pack. It prints lines per CPU second (this process's CPU
time, one thread: lines/s per core), the counts of each pattern from both, and whether
they are equal; the run fails if they are not. Rounds alternate the two; the table gives
the median. A second table times a user pattern that backtracks, ``(a+)+$``, on one
line of N ``a``s and a ``b``: exponential in N under ``re``, linear under RE2.
Bounded: at most 10**6 lines, 9 rounds, N at most 24.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.logtail import DEFAULT_PATTERNS, LineMatcher, LogFollower, Pattern

CHUNK = 1024 * 1024


def generate(n: int, seed: int) -> list[str]:
    """``n`` lines of a mixed log, the same for the same seed."""
    rnd = random.Random(seed)  # noqa: S311 - a reproducible log, not a secret
    ips = [f"203.0.113.{i}" for i in range(1, 60)] + ["127.0.0.1", "10.0.0.12", "2001:db8::7"]
    paths = ["/", "/api/items", "/api/items/{id}", "/api/orders/{id}/lines?page={p}", "/static/app.{id}.js",
             "/health", "/login", "/api/search?q=shoes&page={p}", "/admin/reports/{id}", "/metrics"]
    agents = ["Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
              "curl/8.5.0", "python-requests/2.31.0", "Prometheus/2.45.0", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1)"]
    names = ["Zoë Müller", "José Álvarez", "Ana", "Łukasz", "Chloé", "Bob"]
    out: list[str] = []
    t = 0
    while len(out) < n:
        t += 1
        r = rnd.random()
        clock = f"03:{t // 60 % 60:02d}:{t % 60:02d}"
        iso = f"2026-11-22 {clock}"
        ms = f"{rnd.randrange(1000):03d}"
        pid = rnd.randrange(1000, 9000)
        path = rnd.choice(paths).format(id=rnd.randrange(10**6), p=rnd.randrange(20))
        if r < 0.40:  # nginx / gunicorn access log, combined format
            status = rnd.choices([200, 201, 204, 301, 304, 404, 500, 502, 503], [70, 5, 3, 2, 8, 8, 2, 1, 1])[0]
            out.append(f'{rnd.choice(ips)} - - [22/Nov/2026:{clock} +0000] "{rnd.choice(["GET", "POST"])} {path} '
                       f'HTTP/1.1" {status} {rnd.randrange(20, 90000)} "-" "{rnd.choice(agents)}"')
        elif r < 0.55:  # uvicorn access log
            code, phrase = rnd.choices([(200, "OK"), (404, "Not Found"), (500, "Internal Server Error")], [90, 8, 2])[0]
            out.append(f'INFO:     127.0.0.1:{rnd.randrange(30000, 60000)} - "GET {path} HTTP/1.1" {code} {phrase}')
        elif r < 0.80:  # the application's own lines
            level = rnd.choices(["INFO", "DEBUG", "WARNING", "ERROR"], [60, 25, 10, 5])[0]
            out.append(f"{iso},{ms} {level} [app.views] order {rnd.randrange(10**6)} created for customer "
                       f"{rnd.randrange(10**4)} ({rnd.choice(names)}) in {rnd.random() * 50:.1f} ms")
        elif r < 0.86:  # celery
            task = f"{rnd.getrandbits(64):016x}-{rnd.getrandbits(32):08x}"
            out.append(rnd.choice([
                f"[{iso},{ms}: INFO/MainProcess] Task app.tasks.send_email[{task}] received",
                f"[{iso},{ms}: INFO/ForkPoolWorker-2] Task app.tasks.send_email[{task}] succeeded in "
                f"{rnd.random():.4f}s: None",
            ]))
        elif r < 0.90:  # gunicorn's, PostgreSQL's and Redis's own lines
            out.append(rnd.choice([
                f"[{iso} +0000] [1234] [INFO] Booting worker with pid: {pid}",
                f"[{iso} +0000] [1234] [INFO] Handling signal: hup",
                f"[{iso} +0000] [1234] [INFO] Worker (pid:{pid}) was sent SIGTERM!",
                f"{pid}:M 22 Nov 2026 {clock}.{ms} * Background saving started by pid {pid + 1}",
                f"{pid}:M 22 Nov 2026 {clock}.{ms} # WARNING Memory overcommit must be enabled!",
                f"{iso}.{ms} UTC [{pid}] LOG:  checkpoint starting: time",
                f'{iso}.{ms} UTC [{pid}] ERROR:  duplicate key value violates unique constraint "users_email_key"',
            ]))
        elif r < 0.97:
            out.append(f"{iso},{ms} INFO [app.payments] charge {rnd.randrange(10**8)} captured "
                       f"amount={rnd.randrange(100, 10**5)} currency=EUR memory_mb={rnd.randrange(100, 900)}")
        else:  # trouble, of every kind the pack knows
            out.extend(rnd.choice([
                ["Traceback (most recent call last):",
                 '  File "/srv/app/app/views.py", line 42, in create_order',
                 "    order = db.session.execute(stmt)",
                 "sqlalchemy.exc.OperationalError: (psycopg2.OperationalError) connection to server at "
                 '"127.0.0.1", port 5432 failed: Connection refused'],
                ["Traceback (most recent call last):",
                 '  File "/srv/app/app/api.py", line 17, in parse',
                 "    return json.loads(body)",
                 "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)"],
                [f"[{iso} +0000] [1234] [CRITICAL] WORKER TIMEOUT (pid:{pid})",
                 f"[{iso} +0000] [1234] [ERROR] Worker (pid:{pid}) was sent SIGKILL! Perhaps out of memory?"],
                [f"Nov 22 {clock} web1 kernel: Out of memory: Killed process {pid} (gunicorn) total-vm:812044kB, "
                 "anon-rss:518420kB, file-rss:1240kB, shmem-rss:0kB, UID:1000 pgtables:1234kB oom_score_adj:0"],
                [f"{iso}.{ms} UTC [{pid}] ERROR:  out of memory",
                 f'{iso}.{ms} UTC [{pid}] DETAIL:  Failed on request of size 8192 in memory context "ExecutorState".'],
                [f'{iso}.{ms} UTC [{pid}] FATAL:  password authentication failed for user "app"'],
                ["redis.exceptions.OutOfMemoryError: OOM command not allowed when used memory > 'maxmemory'."],
                ["redis.exceptions.ConnectionError: Error 111 connecting to 127.0.0.1:6379. Connection refused."],
                ["PermissionError: [Errno 13] Permission denied: '/srv/app/uploads/report.pdf'"],
                ["OSError: [Errno 28] No space left on device"],
                ["OSError: [Errno 98] Address already in use"],
                ["ssl.SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                 "certificate has expired (_ssl.c:1006)"],
                ["MemoryError"],
            ]))
    return out[:n]


def old_algorithm(path: Path, patterns: list[Pattern]) -> tuple[int, Counter[str]]:
    """The exporter's matching before RE2: every pattern searched in every decoded line."""
    counts: Counter[str] = Counter()
    lines = 0
    partial = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            split = (partial + chunk).split(b"\n")
            partial = split.pop()
            for raw in split:
                lines += 1
                text = raw.decode("utf-8", "replace")
                for p in patterns:
                    if p.regex.search(text):
                        counts[p.name] += 1
    return lines, counts


def new_algorithm(path: Path, patterns: list[Pattern]) -> tuple[int, Counter[str]]:
    """The exporter's follower, reading the whole file in one poll."""
    follower = LogFollower(path, patterns, read_limit=2**40, from_start=True)
    try:
        counts = follower.poll()
        return follower.lines, counts
    finally:
        follower.close()


Algorithm = Callable[[Path, list[Pattern]], tuple[int, Counter[str]]]


def timed(run: Algorithm, path: Path, patterns: list[Pattern], expected_lines: int) -> tuple[float, Counter[str]]:
    started = time.process_time()
    lines, counts = run(path, patterns)
    cpu = time.process_time() - started
    if lines != expected_lines:
        raise SystemExit(f"{run.__name__} read {lines} lines, not {expected_lines}")
    return cpu, counts


def backtracking(sizes: list[int]) -> list[tuple[int, float, float]]:
    """CPU seconds of ``(a+)+$`` on one line of n ``a``s and a ``b``, under re and RE2."""
    pattern = Pattern("user", re.compile(r"(a+)+$"), "error")
    matcher = LineMatcher([pattern])
    rows = []
    for n in sizes:
        line = "x " + "a" * n + "b"
        started = time.process_time()
        old = pattern.regex.search(line)
        old_cpu = time.process_time() - started
        counts: Counter[str] = Counter()
        started = time.process_time()
        matcher.count(line.encode(), counts)
        new_cpu = time.process_time() - started
        assert old is None and not counts
        rows.append((n, old_cpu, new_cpu))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backtrack", type=int, nargs="*", default=[16, 20, 24],
                        help="line lengths for the backtracking table (default: %(default)s)")
    args = parser.parse_args()
    if not 0 < args.lines <= 10**6 or not 0 < args.rounds <= 9 or any(n > 24 for n in args.backtrack):
        raise SystemExit("bounded: 1 to 10**6 lines, 1 to 9 rounds, backtracking lines of at most 24")
    patterns = [Pattern(name, re.compile(regex), severity) for name, (regex, severity) in DEFAULT_PATTERNS.items()]
    lines = generate(args.lines, args.seed)
    with tempfile.TemporaryDirectory(prefix="caretaker-bench-logs-") as tmp:
        path = Path(tmp) / "mixed.log"
        path.write_text("".join(line + "\n" for line in lines))
        size = path.stat().st_size
        cpus: dict[Algorithm, list[float]] = {old_algorithm: [], new_algorithm: []}
        counts: dict[Algorithm, Counter[str]] = {}
        for i in range(args.rounds):
            for run in list(cpus) if i % 2 == 0 else reversed(list(cpus)):
                cpu, counts[run] = timed(run, path, patterns, len(lines))
                cpus[run].append(cpu)
    old_counts, new_counts = counts[old_algorithm], counts[new_algorithm]
    matching = sum(1 for line in lines if any(p.regex.search(line) for p in patterns))
    equal = old_counts == new_counts
    old_s, new_s = statistics.median(cpus[old_algorithm]), statistics.median(cpus[new_algorithm])
    print(f"{len(lines):,} lines ({size / 2**20:.1f} MiB, {matching / len(lines):.1%} match a pattern), "
          f"{len(patterns)} patterns (the default pack), median of {args.rounds} rounds, {os.cpu_count()} CPUs; "
          "CPU s = this process's CPU time (one thread)")
    print(f"{'algorithm':<44} | {'lines/s per core':>16} | {'CPU s':>7} | counts equal")
    print("-" * 88)
    print(f"{'re.search per pattern per line (before)':<44} | {len(lines) / old_s:16,.0f} | {old_s:7.3f} | (reference)")
    print(f"{'RE2 block scan, then its lines (exporter)':<44} | {len(lines) / new_s:16,.0f} | {new_s:7.3f} | "
          f"{'yes' if equal else 'NO'}")
    print(f"{'':<44} | {'x' + format(old_s / new_s, '.1f'):>16} |")
    print()
    print(f"{'pattern':<28} | {'before':>7} | {'exporter':>8}")
    for p in patterns:
        print(f"{p.name:<28} | {old_counts[p.name]:7d} | {new_counts[p.name]:8d}")
    if args.backtrack:
        print()
        print("user pattern (a+)+$ on one line of N 'a's and a 'b' (no match): CPU seconds")
        print(f"{'N':>3} | {'re':>10} | {'RE2':>10}")
        for n, old_cpu_n, new_cpu_n in backtracking(args.backtrack):
            print(f"{n:3d} | {old_cpu_n:10.4f} | {new_cpu_n:10.6f}")
    if not equal:
        raise SystemExit("counts differ")


if __name__ == "__main__":
    main()
