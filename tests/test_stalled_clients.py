"""More stalled clients than the receiver has descriptors: a valid alert is still
answered without waiting for them, the receiver never runs out of descriptors (asyncio
would then stop accepting for a second), the stalled connections are closed within the
header timeout, and the log grows by a few lines, not a flood."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .helpers import AUTH_TOKEN, REPO, free_port, port_open, require_binary, wait_for

pytestmark = pytest.mark.timeout(90)

NOFILE = 256
STALLED = 400  # more than the receiver's descriptor limit


def limited_receiver(tmp_path: Path, receiver: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """The receiver with ``receiver`` added to its config's ``receiver:`` map, started
    under a descriptor limit of NOFILE; its process, port and log file."""
    prlimit = require_binary("prlimit")
    port = free_port()
    (tmp_path / "token").write_text(AUTH_TOKEN)
    (tmp_path / "caretaker.yml").write_text(
        f"receiver: {{port: {port}, bearer_token: {{file: token}}, state_file: state.sqlite, {receiver}}}\n"
        "services:\n  svc: {match: {comm: '^caretaker-none$'}, processes: {min: 0, max: 1}}\n")
    log_path = tmp_path / "receiver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([prlimit, f"--nofile={NOFILE}:{NOFILE}", "--", sys.executable, "-m",
                                 "receiver.app", "--config", str(tmp_path / "caretaker.yml")],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port, log_path


def test_stalled_connections_do_not_lock_out_a_valid_alert(tmp_path: Path) -> None:
    receiver, port, log_path = limited_receiver(tmp_path, "max_connections: 64, header_timeout: 5s")
    stalled: list[socket.socket] = []
    try:
        wait_for(lambda: port_open(port), 20, what="the receiver")
        lines_before = len(log_path.read_text().splitlines())
        for _ in range(STALLED):  # half a request head each, never finished
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            stalled.append(s)
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # evicted at once: over the limit
                s.sendall(b"POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        body = json.dumps({"version": "4", "status": "firing", "alerts": [{
            "status": "firing", "labels": {"alertname": "A", "service_name": "svc"},
            "startsAt": "2026-11-23T00:00:00Z", "fingerprint": "valid1"}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {AUTH_TOKEN}"})
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
        waited = time.monotonic() - started
        # Answered while the stalled connections were still open: nothing had to time out first.
        assert waited < 4.0, f"the valid alert waited {waited:.2f} s"
        assert closed_connections(port)["header_timeout"] == 0, "the valid alert was answered only after timeouts"
        # Every stalled connection is closed by the receiver within the header timeout.
        deadline = time.monotonic() + 5.0 + 3.0
        for s in stalled:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = s.recv(100)  # the receiver closing it ends the wait: EOF, or a reset
            except ConnectionResetError:
                continue
            except TimeoutError:
                pytest.fail("a stalled connection was not closed within the header timeout")
            assert data == b"", data
        closed = closed_connections(port)
        assert closed["over_limit"] + closed["header_timeout"] >= STALLED - 1
        assert closed["header_timeout"] >= 60
        assert receiver.poll() is None
    finally:
        for s in stalled:
            s.close()
        receiver.terminate()
        receiver.wait(10)
    log = log_path.read_text()
    assert "Traceback" not in log
    assert "Too many open files" not in log, log[-2000:]
    assert "client or connection error" not in log, log[-2000:]  # nor anything that could hide it
    assert len(log.splitlines()) - lines_before <= 5, log[-2000:]


def closed_connections(port: int) -> dict[str, float]:
    """caretaker_receiver_connections_closed_total by reason, from the receiver's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    return {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("caretaker_receiver_connections_closed_total{")}


def test_a_burst_waits_in_the_kernel_queue_not_in_syn_retries(tmp_path: Path) -> None:
    """asyncio's backlog argument (its accept batch) is 16; the kernel's queue must stay
    large, or a burst of connections while the receiver is busy has its SYNs dropped and
    waits a second per retry. Stopped (SIGSTOP), the receiver accepts nothing: every
    connection of the burst must still complete its handshake at once."""
    receiver, port, _log = limited_receiver(tmp_path, "max_connections: 64")
    burst: list[socket.socket] = []
    try:
        wait_for(lambda: port_open(port), 20, what="the receiver")
        os.killpg(receiver.pid, signal.SIGSTOP)
        try:
            for i in range(100):  # below any net.core.somaxconn (128 on old kernels), far above 16
                try:
                    burst.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
                except TimeoutError:
                    pytest.fail(f"connection {i + 1} of the burst waited for a SYN retry: the kernel queue is short")
        finally:
            os.killpg(receiver.pid, signal.SIGCONT)
        assert len(burst) == 100
    finally:
        for s in burst:
            s.close()
        receiver.terminate()
        receiver.wait(10)


def test_a_descriptor_limit_too_low_for_max_connections_is_named_at_start(tmp_path: Path) -> None:
    receiver, port, log_path = limited_receiver(tmp_path, "max_connections: 256")
    try:
        wait_for(lambda: port_open(port), 20, what="the receiver")
        wait_for(lambda: "max_connections" in log_path.read_text(), 5, what="the warning")
        assert receiver.poll() is None
    finally:
        receiver.terminate()
        receiver.wait(10)
    log = log_path.read_text()
    assert "receiver.max_connections 256 needs about 368 descriptors and the limit is 256 (LimitNOFILE)" in log, log
