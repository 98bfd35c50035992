"""Declared files are checked at a bounded cost, and restore_file never replaces a file it
could not prove corrupt: a FIFO is reported, never opened for reading; a valid file over
the parse limit is "not checked", never "corrupt"."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from exporter.config import FileCheck
from exporter.files import FileChecker, check_parse
from receiver.actions import RepairFailed
from receiver.repairs import BackupKeeper

from .helpers import AUTH, MakeConfig, alert, notification, sleeper, wait_audit, wait_until

pytestmark = pytest.mark.timeout(60)


async def bounded(func: Any, *args: Any) -> Any:
    """Run a blocking check in a thread, failing the test (not hanging it) after 5 s."""
    return await asyncio.wait_for(asyncio.to_thread(func, *args), 5)


async def test_a_fifo_is_reported_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    parsed = await bounded(check_parse, fifo, "json")
    assert parsed.valid is None and "a FIFO" in parsed.detail
    status = await bounded(FileChecker(FileCheck(path="state.json", format="json"), fifo).check, time.time())
    assert status.exists and status.valid is None and status.ok  # not read, and not called corrupt


async def test_restore_file_leaves_a_fifo_alone_and_does_not_hang(run_repair: Any, make_config: MakeConfig,
                                                                  tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "state.json")
    (tmp_path / "default.json").write_text("{}")
    config = make_config(service={"match": {"comm": "^none$"},
                                  "files": [{"path": "state.json", "format": "json", "default": "default.json"}],
                                  "remediation": {"allow": ["restore_file"]}})
    with pytest.raises(RepairFailed, match="not proven corrupt, so not replaced"):
        await asyncio.wait_for(run_repair(config, "restore_file"), 10)
    assert (tmp_path / "state.json").is_fifo()


async def test_a_valid_file_over_the_parse_limit_is_not_checked_and_never_rolled_back(
        run_repair: Any, make_config: MakeConfig, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"small": True}))
    config = make_config(service={"match": {"comm": "^none$"},
                                  "files": [{"path": "state.json", "format": "json", "backups": 2,
                                             "max_parse_bytes": 1000}],
                                  "remediation": {"allow": ["restore_file"]}})
    keeper = BackupKeeper(config, tmp_path / "state.sqlite.d" / "backups")
    assert keeper.run_once() == 1  # the small, valid version is backed up
    big = {"items": list(range(1000))}  # valid JSON, 4,890 bytes: over the limit
    state.write_text(json.dumps(big))
    os.utime(state, (time.time() + 5, time.time() + 5))
    assert keeper.run_once() == 0  # not backed up: it could not be checked
    spec = config.services["svc"].files[0]
    status = FileChecker(spec, state).check(time.time())
    assert status.valid is None and "over the parse limit of 1000" in status.detail
    with pytest.raises(RepairFailed, match="not proven corrupt, so not replaced"):
        await run_repair(config, "restore_file")
    assert json.loads(state.read_text()) == big  # no silent rollback to the small backup
    assert not list(tmp_path.glob("state.json.corrupt-*"))


async def test_the_exporter_says_nan_for_a_file_it_could_not_check(exporter_for: Any, make_config: MakeConfig,
                                                                   tmp_path: Path) -> None:
    from exporter.app import REGISTRY_KEY

    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "bad.json").write_text("{not json")
    config = make_config(service={"match": {"comm": "^none$"}, "processes": {"min": 0, "max": 1},
                                  "files": [{"path": "pipe.json", "format": "json"},
                                            {"path": "bad.json", "format": "json"}]})
    client = await exporter_for(config)
    assert (await client.get("/metrics")).status == 200
    registry = client.server.app[REGISTRY_KEY]
    pipe = registry.get_sample_value("caretaker_file_valid", {"service_name": "svc", "path": "pipe.json"})
    assert pipe is not None and math.isnan(pipe)
    assert registry.get_sample_value("caretaker_file_valid", {"service_name": "svc", "path": "bad.json"}) == 0


async def test_state_evidence_and_backups_are_private(receiver_for: Any, make_config: MakeConfig,
                                                      tmp_path: Path) -> None:
    import stat

    from exporter.heartbeats import HeartbeatStore
    from receiver.app import EXECUTOR_KEY
    from receiver.process import start_service

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    os.umask(0o022)
    (tmp_path / "app-state.json").write_text('{"password": "hunter2"}')
    (tmp_path / "app-state.json").chmod(0o644)
    service = sleeper()
    service["files"] = [{"path": "app-state.json", "format": "json", "backups": 2}]
    config = make_config({"svc": service}, token=True, state_file="var/state.sqlite")
    client = await receiver_for(config)
    executor = client.server.app[EXECUTOR_KEY]
    executor.ctx.reaper.add(start_service(config, "svc"))
    resp = await client.post("/alerts", json=notification(alert("m1", service_name="svc", remediation="restart",
                                                                alertname="CaretakerMemoryLeakSuspected")),
                             headers=AUTH)
    assert resp.status == 200
    await wait_audit(client, lambda es: any(e["result"] for e in es))  # a restart: evidence kept
    var = tmp_path / "var"
    await wait_until(lambda: list((var / "backups").rglob("[0-9]*")), 10,
                     what="the receiver's backup of the state file")
    assert mode(var) == 0o700
    assert mode(var / "state.sqlite") == 0o600
    assert mode(var / "state.sqlite-wal") == 0o600
    (evidence,) = (var / "evidence").iterdir()
    assert (mode(var / "evidence"), mode(evidence)) == (0o700, 0o600)
    (backup,) = (var / "backups" / "svc").rglob("[0-9]*")
    assert (mode(var / "backups"), mode(backup)) == (0o700, 0o600)
    beats = HeartbeatStore(tmp_path / "exporter" / "beats.json", ["w"])
    beats.save()
    assert (mode(tmp_path / "exporter"), mode(tmp_path / "exporter" / "beats.json")) == (0o700, 0o600)
