"""Declared files, directories and the filesystems of data paths, as exposed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .helpers import MakeConfig, idle_service, scrape_samples, value


async def test_file_checks(exporter_for: Any, make_config: MakeConfig, tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"ok": true}')
    (tmp_path / "broken.json").write_text('{"ok": tru')
    (tmp_path / "old.yml").write_text("a: 1\n")
    os.utime(tmp_path / "old.yml", (time.time() - 7200, time.time() - 7200))
    (tmp_path / "wrong-mode.txt").write_text("x")
    os.chmod(tmp_path / "wrong-mode.txt", 0o644)
    (tmp_path / "data").mkdir(mode=0o700)
    os.chmod(tmp_path / "data", 0o700)
    os.chmod(tmp_path / "state.json", 0o600)
    client = await exporter_for(make_config(service=idle_service(**{
        "files": [{"path": "state.json", "format": "json", "mode": "0600"},
                  {"path": "broken.json", "format": "json"},
                  {"path": "old.yml", "format": "yaml", "max_age": "1h"},
                  {"path": "absent.json", "format": "json"},
                  {"path": "wrong-mode.txt", "mode": "0600"}],
        "directories": [{"path": "data", "mode": "0700"}, {"path": "missing-dir"}],
        "data_paths": ["data"]})))
    data = await scrape_samples(client)
    f = {"service_name": "svc"}
    assert value(data, "caretaker_file_valid", path="state.json", **f) == 1
    assert value(data, "caretaker_file_attributes_match", path="state.json", **f) == 1
    assert value(data, "caretaker_file_size_bytes", path="state.json", **f) == 12
    assert value(data, "caretaker_file_valid", path="broken.json", **f) == 0
    assert value(data, "caretaker_file_exists", path="broken.json", **f) == 1
    assert value(data, "caretaker_file_exists", path="absent.json", **f) == 0
    assert value(data, "caretaker_file_max_age_seconds", path="old.yml", **f) == 3600
    assert time.time() - value(data, "caretaker_file_mtime_timestamp_seconds", path="old.yml", **f) > 7000
    assert value(data, "caretaker_directory_exists", path="data", **f) == 1
    assert value(data, "caretaker_directory_attributes_match", path="data", **f) == 1
    assert value(data, "caretaker_directory_exists", path="missing-dir", **f) == 0
    st = os.statvfs(tmp_path / "data")
    assert value(data, "caretaker_filesystem_size_bytes", path="data", **f) == st.f_blocks * st.f_frsize
    assert value(data, "caretaker_filesystem_avail_bytes", path="data", **f) > 0
    assert value(data, "caretaker_file_attributes_match", path="wrong-mode.txt", **f) == 0
    # integrity: 5 files and 2 directories; state.json and data are as they should be
    assert value(data, "caretaker_service_health_component_ratio", component="integrity", **f) == 2 / 7

