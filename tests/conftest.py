"""Fixtures: ports, child processes, a fake /proc tree, real servers, configs, the apps
under test, repair contexts; and a guard that fails a test which blocks the event loop.
What test modules share that is not a fixture is in helpers.py."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from exporter.app import create_app as create_exporter
from exporter.config import Config
from exporter.procfs import ProcReader
from receiver.actions import ActionContext, StepLog
from receiver.app import create_app as create_receiver
from receiver.catalogue import run_action
from receiver.evidence import EvidenceKeeper
from receiver.repairs import BackupKeeper

from .helpers import (
    Children,
    Client,
    FakeProc,
    MakeConfig,
    Postgres,
    build_config,
    free_port,
    leave_alone,
    port_open,
    postgres_bin,
    require_binary,
    stop_services,
    wait_for,
    wait_until,
)

# --- no blocking waits on the event loop ------------------------------------------------------

_real_sleep = time.sleep
_real_wait = subprocess.Popen.wait
_BLOCKS = ("on the event loop's thread stops the app under test (which runs on that loop) while the test "
           "waits: await asyncio.sleep() or helpers.wait_until(), or run the blocking call in asyncio.to_thread()")


def _on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop runs in this thread: a sync test or fixture, a worker thread
        return False
    return True


def _sleep_off_the_loop(seconds: float) -> None:
    if _on_a_loop():
        raise AssertionError(f"time.sleep() (wait_for() too) {_BLOCKS}")
    _real_sleep(seconds)


def _wait_off_the_loop(self: subprocess.Popen[Any], timeout: float | None = None) -> int:
    if _on_a_loop():
        raise AssertionError(f"Popen.wait() (subprocess.run() too) {_BLOCKS}")
    return _real_wait(self, timeout)


@pytest.fixture(autouse=True)
def no_blocking_waits_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``time.sleep`` and ``Popen.wait`` raise when called on a thread that runs an event
    loop, as aiohttp's own suite fails a test that blocks the loop: there, the test's wait
    would stop the app under test (its workers, its reaper, its answers) as well."""
    monkeypatch.setattr(time, "sleep", _sleep_off_the_loop)
    monkeypatch.setattr(subprocess.Popen, "wait", _wait_off_the_loop)


# --- ports, processes, a fake /proc -----------------------------------------------------------

@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    c.stop_all()


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def fake_proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


# --- configs ----------------------------------------------------------------------------------

@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """make_config(services | service=..., exporter=..., token=False, directory=tmp_path,
    **receiver) -> Config: :func:`helpers.build_config` with the test's ``tmp_path`` as the
    config file's directory unless ``directory`` is given."""
    def make(services: Mapping[str, Any] | None = None, /, *, service: Mapping[str, Any] | None = None,
             exporter: Mapping[str, Any] | None = None, token: bool = False, directory: Path | None = None,
             **receiver: Any) -> Config:
        return build_config(directory or tmp_path, services, service=service, exporter=exporter, token=token,
                            **receiver)
    return make


# --- real Redis -------------------------------------------------------------------------

@pytest.fixture
def redis_server(children: Children, tmp_path: Path) -> Callable[[int], subprocess.Popen[bytes]]:
    """redis_server(port) -> a Redis started on ``port``, once it listens. It waits
    (blocking): from async code, ``await asyncio.to_thread(redis_server, port)``."""
    binary = require_binary("redis-server")

    def start(port: int) -> subprocess.Popen[bytes]:
        proc = children.start([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)])
        wait_for(lambda: port_open(port), 10, what=f"redis on {port}")
        return proc

    return start


@pytest.fixture
def redis_port(redis_server: Callable[[int], subprocess.Popen[bytes]]) -> int:
    """The port of a fresh, empty Redis started for the test."""
    port = free_port()
    redis_server(port)
    return port


# --- a real Alertmanager -------------------------------------------------------------------

@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require_binary("prometheus-alertmanager", "alertmanager")
    tmp = tmp_path_factory.mktemp("am")
    (tmp / "am.yml").write_text("route: {receiver: nobody}\nreceivers: [{name: nobody}]\n")
    port = free_port()
    children = Children()
    children.start([binary, f"--config.file={tmp / 'am.yml'}", f"--storage.path={tmp}",
                    f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="])
    try:
        wait_for(lambda: port_open(port), 20, what="alertmanager")
        yield f"http://127.0.0.1:{port}"
    finally:
        children.stop_all()


# --- real PostgreSQL ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Postgres]:
    postgres_bin("postgres")
    root = Path(tempfile.mkdtemp(prefix="caretaker-pg-"))  # pytest's tmp dirs are 0700: not for user postgres
    os.chmod(root, 0o755)
    server = Postgres(root / "cluster", free_port(), "s3cret-pw")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- the apps under test ----------------------------------------------------------------------

@pytest.fixture
async def receiver_for() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """receiver_for(config, **create_app_kwargs) -> a started test client; at teardown the
    config's services are stopped first (so closing the app reaps them), then the app."""
    made: list[tuple[Client, Config]] = []

    async def make(config: Config, **kwargs: Any) -> Client:
        client = TestClient(TestServer(create_receiver(config, **kwargs), host="127.0.0.1"))
        made.append((client, config))  # closed at teardown even if it fails to start
        await client.start_server()
        return client

    yield make
    for client, _ in made:
        await leave_alone(client)
    for client, config in made:
        await stop_services(config)
        await client.close()


@pytest.fixture
async def exporter_for() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """exporter_for(config, reader=None) -> a started test client (real /proc unless given)."""
    clients: list[Client] = []

    async def make(config: Config, reader: ProcReader | None = None) -> Client:
        client = TestClient(TestServer(create_exporter(config, reader), host="127.0.0.1"))
        clients.append(client)  # closed at teardown even if it fails to start
        await client.start_server()
        return client

    yield make
    for c in clients:
        await c.close()


# --- repairs without a receiver ----------------------------------------------------------------

@pytest.fixture
async def ctx_for() -> AsyncIterator[Callable[..., ActionContext]]:
    """ctx_for(config, **fields) -> an ActionContext (one HTTP session for all); at
    teardown the config's services are stopped and the children it started reaped."""
    contexts: list[ActionContext] = []
    async with aiohttp.ClientSession() as session:
        def make(config: Config, **fields: Any) -> ActionContext:
            contexts.append(ActionContext(config, session, **fields))
            return contexts[-1]
        yield make
    for ctx in contexts:
        await stop_services(ctx.config)
        await wait_until(functools.partial(reaped, ctx), 5, what="children reaped")


def reaped(ctx: ActionContext) -> bool:
    """Reap what the context started; whether none is left."""
    ctx.reaper.reap()
    return not ctx.reaper.children


@pytest.fixture
def run_repair(ctx_for: Callable[..., ActionContext]) -> Callable[..., Awaitable[StepLog]]:
    """run_repair(config, action, labels=None, service="svc") -> the StepLog of one repair,
    as the receiver runs it (evidence and backups beside its state file), without a receiver."""
    async def go(config: Config, action: str, labels: dict[str, str] | None = None,
                 service: str = "svc") -> StepLog:
        state = config.resolve(config.receiver.state_file).parent
        ctx = ctx_for(config, reader=ProcReader(), labels=labels or {},
                      backups=BackupKeeper(config, state / "backups"),
                      evidence=EvidenceKeeper(config, state / "evidence", ProcReader()))
        steps = StepLog()
        await run_action(ctx, action, service, steps)
        return steps
    return go


@pytest.fixture
def release_claims(run_repair: Callable[..., Awaitable[StepLog]]) -> Callable[[Config], Awaitable[StepLog]]:
    """release_claims(config) -> the StepLog of one release_claims of service ``worker``."""
    return functools.partial(run_repair, action="release_claims", service="worker")
