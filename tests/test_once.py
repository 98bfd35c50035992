"""``caretaker-exporter --once``: the status table, JSON, and the exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .helpers import REPO, Children, free_port, wait_for


def test_once_prints_status_and_exit_code(tmp_path: Path, children: Children, python: str) -> None:
    marker = f"once-{os.getpid()}"
    (tmp_path / "app.log").write_text("Traceback (most recent call last):\nKeyError: 1\n")
    config = {"exporter": {"state_file": "st.json"}, "services": {
        "up": {"match": {"cmdline": f"{marker}$"}},
        "down": {"match": {"cmdline": "never-running-xyz$"}, "logs": [{"path": "app.log"}],
                 "probes": [{"name": "port", "type": "tcp", "port": free_port()}]}}}
    path = tmp_path / "caretaker.yml"
    path.write_text(json.dumps(config))
    proc = children.start([python, "-c", "import time; time.sleep(60)", marker])
    wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().endswith(marker.encode() + b"\0"), 5)
    table = subprocess.run([sys.executable, "-m", "exporter.app", "--config", str(path), "--once"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert table.returncode == 1, table.stderr
    lines = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert lines["up"].split()[1:3] == ["1/1", "1.00"]
    assert "port (refused)" in lines["down"] and "python_traceback 1" in lines["down"]
    as_json = subprocess.run([sys.executable, "-m", "exporter.app", "--config", str(path), "--once", "--json"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    rows = {r["service"]: r for r in json.loads(as_json.stdout)["services"]}
    assert rows["down"]["failing_probes"] == {"port": "refused"} and rows["up"]["health"] == 1.0
    config["services"].pop("down")
    path.write_text(json.dumps(config))
    healthy = subprocess.run([sys.executable, "-m", "exporter.app", "--config", str(path), "--once"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert healthy.returncode == 0, healthy.stdout

