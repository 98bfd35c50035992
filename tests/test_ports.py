"""Ports: who listens, and a port held by a process that is not the service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.config import parse_config

from .conftest import Children, free_port, port_open, wait_for
from .test_exporter import scrape_samples, value


async def test_port_held_by_another_process_is_a_conflict(exporter_for: Any, tmp_path: Path, children: Children,
                                                          python: str) -> None:
    port = free_port()
    squatter = ("import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(60)\n")
    proc = children.start([python, "-c", squatter, "squatter"])
    wait_for(lambda: port_open(port), 10, what="squatter listening")
    config = parse_config({"services": {
        "svc": {"match": {"cmdline": "^nothing-matches$"}, "ports": [port]},
        "owner": {"match": {"cmdline": "squatter$"}, "ports": [port]}}}, base_dir=tmp_path)
    data = await scrape_samples(await exporter_for(config))
    assert value(data, "caretaker_service_port_listening", service_name="svc", port=str(port)) == 1
    assert value(data, "caretaker_service_port_conflict", service_name="svc", port=str(port)) == 1
    holder = [k for k in data if k[0] == "caretaker_service_port_holder_info" and ("service_name", "svc") in k[1]]
    assert len(holder) == 1
    info = dict(holder[0][1])
    assert info["pid"] == str(proc.pid)
    assert info["comm"].startswith("python")
    assert value(data, "caretaker_service_port_conflict", service_name="owner", port=str(port)) == 0

