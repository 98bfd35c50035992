"""Ports: who listens (exporter/sockets.py), and a port held by a process that is not the service."""

from __future__ import annotations

import os
from typing import Any

from exporter.sockets import PortStatus, check_port, holders, listening_table, port_holders

from .helpers import Children, MakeConfig, free_port, port_open, scrape_samples, value, wait_for, wait_until


async def test_port_held_by_another_process_is_a_conflict(exporter_for: Any, make_config: MakeConfig,
                                                          children: Children, python: str) -> None:
    port = free_port()
    squatter = ("import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(60)\n")
    proc = children.start([python, "-c", squatter, "squatter"])
    await wait_until(lambda: port_open(port), 10, what="squatter listening")
    config = make_config({"svc": {"match": {"cmdline": "^nothing-matches$"}, "ports": [port]},
                          "owner": {"match": {"cmdline": "squatter$"}, "ports": [port]}})
    data = await scrape_samples(await exporter_for(config))
    assert value(data, "caretaker_service_port_listening", service_name="svc", port=str(port)) == 1
    assert value(data, "caretaker_service_port_conflict", service_name="svc", port=str(port)) == 1
    holder = [k for k in data if k[0] == "caretaker_service_port_holder_info" and ("service_name", "svc") in k[1]]
    assert len(holder) == 1
    info = dict(holder[0][1])
    assert info["pid"] == str(proc.pid)
    assert info["comm"].startswith("python")
    assert value(data, "caretaker_service_port_conflict", service_name="owner", port=str(port)) == 0


def test_the_holders_of_a_port_are_found_among_the_given_processes(children: Children, python: str) -> None:
    port = free_port()
    listener = ("import socket, time\ns = socket.socket()\n"
                f"s.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(60)\n")
    holder = children.start([python, "-c", listener])
    other = children.start([python, "-c", "import time; time.sleep(60)"])
    wait_for(lambda: port_open(port), 10, what="listener")
    table = listening_table()
    assert table[port]
    assert port_holders([port], [other.pid, holder.pid], table=table) == {holder.pid}
    assert port_holders([port], [other.pid]) == set()
    assert [pid for pid, _ in holders(table[port], [other.pid, holder.pid, os.getpid()])] == [holder.pid]
    conflict = check_port(port, [other.pid])
    assert (conflict.listening, conflict.conflict, conflict.holder_pid) == (True, True, holder.pid)
    assert conflict.holder_comm.startswith("python")
    assert check_port(port, [holder.pid]) == PortStatus(True, False)
    assert check_port(free_port(), [holder.pid]) == PortStatus(False, False)
