"""Log patterns: following files (with real logrotate) and the counts exposed."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from exporter.logtail import LogFollower, patterns_for

from .helpers import MakeConfig, build_config, idle_service, require_binary, scrape_samples, value


def follower(path: Path, **kw: Any) -> LogFollower:
    config = build_config(path.parent, service=idle_service(
        logs=[{"path": str(path), "patterns": [{"name": "boom", "regex": "BOOM"}]}]))
    return LogFollower(path, patterns_for(config.services["svc"].logs[0]), **kw)


def append(path: Path, *lines: str) -> None:
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


def test_starts_at_the_end_and_counts_new_lines_once(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "BOOM old", "Traceback (most recent call last):")
    f = follower(log)
    assert f.poll() == {}
    append(log, "BOOM 1", "fine", "Traceback (most recent call last):", "OSError: [Errno 28] No space left on device")
    assert f.poll() == {"boom": 1, "python_traceback": 1, "disk_full": 1}
    assert f.poll() == {}


def test_partial_lines_wait_for_their_newline(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    f = follower(log)
    f.poll()
    with open(log, "a") as out:
        out.write("BO")
    assert f.poll() == {}
    with open(log, "a") as out:
        out.write("OM\n")
    assert f.poll() == {"boom": 1}


def test_missing_file_then_created_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    f = follower(log)
    assert f.poll() == {}
    append(log, "BOOM a", "BOOM b")
    assert f.poll() == {"boom": 2}
    log.unlink()
    assert f.poll() == {}


def test_work_per_poll_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    log.write_text("")
    f = follower(log, read_limit=4096)
    f.poll()
    append(log, *(["BOOM " + "x" * 90] * 200))  # ~19 KiB
    first = f.poll()["boom"]
    assert first < 200
    total = first
    for _ in range(10):
        total += f.poll().get("boom", 0)
    assert total == 200


@pytest.mark.parametrize("method", ["create", "copytruncate"])
def test_real_logrotate_loses_and_doubles_nothing(tmp_path: Path, method: str) -> None:
    logrotate = require_binary("logrotate")
    log = tmp_path / "app.log"
    append(log, "before start BOOM")
    f = follower(log, rotate_wait=0.0 if method == "create" else 30.0)
    f.poll()
    append(log, *[f"line {i} BOOM" for i in range(10)])
    assert f.poll() == {"boom": 10}
    append(log, *[f"unread {i} BOOM" for i in range(7)])  # written, not yet read, then rotated
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n  {method}\n  rotate 3\n  missingok\n}}\n")
    result = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "app.log.1").exists()
    append(log, *[f"after {i} BOOM" for i in range(5)])
    assert f.poll() == {"boom": 12}
    assert f.poll() == {}
    f.close()


async def test_log_matches_are_exposed_per_pattern_and_severity(exporter_for: Any, make_config: MakeConfig,
                                                                tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    client = await exporter_for(make_config(service=idle_service(logs=[{"path": "access.log"}])))
    data = await scrape_samples(client)
    labels = {"service_name": "svc", "pattern": "http_5xx", "severity": "error"}
    assert value(data, "caretaker_log_pattern_matches_total", **labels) == 0
    append(log, '127.0.0.1 - - [22/Nov/2026:03:00:00 +0000] "GET / HTTP/1.1" 502 12',
           '127.0.0.1 - - [22/Nov/2026:03:00:01 +0000] "GET / HTTP/1.1" 200 12',
           'INFO:     127.0.0.1:5000 - "GET /x HTTP/1.1" 500 Internal Server Error')
    data = await scrape_samples(client)
    assert value(data, "caretaker_log_pattern_matches_total", **labels) == 2
    assert value(data, "caretaker_log_pattern_matches_total", service_name="svc", pattern="out_of_memory",
                 severity="critical") == 0

