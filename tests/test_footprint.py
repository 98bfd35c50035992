"""What the exporter loads: client libraries only for the probes a config has.

redis-py and asyncpg together are about 7 MiB of the exporter's RSS, and sqlite3 is only
for ``--once``; a fresh interpreter serves a scrape and reports what it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .helpers import REPO, free_port

SERVE_ONE_SCRAPE = """
import asyncio, json, sys
from aiohttp.test_utils import TestClient, TestServer
from exporter.app import create_app
from exporter.config import load_config

async def main():
    async with TestClient(TestServer(create_app(load_config(sys.argv[1])), host="127.0.0.1")) as client:
        resp = await client.get("/metrics")
        text = await resp.text()
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"redis", "asyncpg", "sqlite3"})
    failed = sorted(line.split("probe=")[1].split('"')[1] for line in text.splitlines()
                    if line.startswith("caretaker_probe_failure_reason{") and 'reason="refused"' in line
                    and line.endswith(" 1.0"))
    print(json.dumps({"status": resp.status, "loaded": loaded, "refused": failed}))

asyncio.run(main())
"""


def serve_one_scrape(tmp_path: Path, probes: list[dict[str, Any]]) -> dict[str, Any]:
    (tmp_path / "app.log").write_text("")
    config = {"exporter": {"state_file": "state.json"},
              "services": {"svc": {"match": {"comm": "^nothing-matches$"}, "probes": probes,
                                   "logs": [{"path": "app.log"}]}}}
    path = tmp_path / "caretaker.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-c", SERVE_ONE_SCRAPE, str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    assert out["status"] == 200
    return out


def test_without_redis_or_postgres_probes_neither_client_library_is_loaded(tmp_path: Path) -> None:
    closed = free_port()
    out = serve_one_scrape(tmp_path, [
        {"name": "web", "type": "http", "url": f"http://127.0.0.1:{closed}/", "timeout": "2s"},
        {"name": "port", "type": "tcp", "port": closed, "timeout": "2s"},
        {"name": "check", "type": "exec", "argv": ["true"]},
    ])
    assert out["refused"] == ["port", "web"]  # the probes ran
    assert out["loaded"] == []


def test_redis_and_postgres_probes_load_their_libraries_when_they_run(tmp_path: Path) -> None:
    closed = free_port()
    out = serve_one_scrape(tmp_path, [
        {"name": "cache", "type": "redis", "port": closed, "timeout": "2s"},
        {"name": "db", "type": "postgres", "port": closed, "timeout": "2s"},
    ])
    assert out["refused"] == ["cache", "db"]
    assert out["loaded"] == ["asyncpg", "redis"]
