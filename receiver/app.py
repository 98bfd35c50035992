"""The receiver's web app.

- ``POST /alerts``: Alertmanager's webhook (payload version 4). Answers at once, after
  validating, deduplicating and queueing: 200 with counts; 400 bad JSON or shape (with
  the reason); 401 missing/wrong bearer token; 413 body over ``receiver.max_body_bytes``;
  415 not ``application/json``; 503 when too many repairs are pending, when the
  shared state (Redis) is down, or when the state file cannot be written (a full
  disk, say): Alertmanager retries on 5xx, never on 4xx.
- ``GET /api/v1/remediations?limit=N&service_name=S``: the audit trail, newest first.
- ``POST /api/v1/plan``: for a webhook payload, what would be done now and why (or why
  not), with each alert's ``host`` label and this receiver's ``host`` and ``fleet``
  mode; nothing is recorded or run.
- ``GET /api/v1/problems?state=open&service_name=S``: the problems the receiver works
  on (open first, then recently closed), with their next attempt time, and this
  receiver's ``host``.
- ``POST /api/v1/services/{name}/reset``: re-enable repairs of a service whose attempt
  budget is spent; its next attempt is due at once (404 for a service not in the config).
- ``POST /api/v1/services/{name}/pause`` (JSON body, optional: ``{"duration": "10m",
  "reason": "..."}``) and ``POST /api/v1/services/{name}/resume``: an operator who stops a
  service on purpose pauses it first; its problems are recorded as ``paused``.
- ``GET /metrics``: the receiver's own metrics. ``GET /-/healthy``.

Auth (``/alerts`` and ``/api/``): a bearer token or basic auth, what Alertmanager's
``http_config`` can send, compared in constant time. Without either, the receiver
refuses to listen beyond loopback.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import sqlite3
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import aiohttp.http_exceptions
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import ValidationError

from exporter.cli import base_parser, load_or_exit, setup_logging
from exporter.config import HOST_LABEL, Config, ConfigError, parse_duration, read_secret
from exporter.procfs import ProcReader

from .actions import ActionContext, ChildReaper, start_problems
from .admission import QueueFull
from .evidence import EvidenceKeeper
from .executor import Executor
from .family import FamilyTracker
from .metrics import ReceiverMetrics
from .payload import Notification
from .repairs import BackupKeeper
from .server import GUARD_KEY, ConnectionGuard, GuardedProtocol, serve
from .shared import SharedState, SharedStateError, key_prefix
from .state import LocalState, RepairState
from .store import Store
from .vocabulary import ProblemState

__all__ = ["EXECUTOR_KEY", "create_app", "main"]

log = logging.getLogger(__name__)

EXECUTOR_KEY = web.AppKey("executor", Executor)
METRICS_KEY = web.AppKey("metrics", ReceiverMetrics)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
TOKEN_KEY = web.AppKey("token", str)
BASIC_KEY = web.AppKey("basic", str)
PROTECTED = ("/alerts", "/api/")
LAYOUT_CHECK_SECONDS = 30.0
"""How often a receiver with shared state looks for repairs recorded in the key layout
before the host (:func:`watch_layout`)."""
SHARED_STATE_CONNECTIONS = 16
"""Connections to the shared-state Redis at most (counted in receiver.server.OWN_DESCRIPTORS)."""


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"status": "error", "error": reason}, status=status)


def authorized(header: str, token: str, basic: str) -> bool:
    """Whether an Authorization header carries the bearer token or the basic credentials.

    Both comparisons always run, in constant time, so timing tells nothing.
    """
    scheme, _, given = header.partition(" ")
    # The bytes as sent: aiohttp keeps undecodable bytes as surrogates, which plain
    # encode() refuses (a 500 before auth); such credentials are simply wrong (401).
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    bearer_ok = hmac.compare_digest(given_bytes, token.encode()) and scheme.lower() == "bearer" and bool(token)
    basic_ok = hmac.compare_digest(given_bytes, basic.encode()) and scheme.lower() == "basic" and bool(basic)
    return bearer_ok or basic_ok


@web.middleware
async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                ) -> web.StreamResponse:
    """Auth for /alerts and /api/, and the count of webhook answers by status code."""
    token, basic = request.app[TOKEN_KEY], request.app[BASIC_KEY]
    transport = request.transport
    connection = transport.get_protocol() if transport is not None else None
    if isinstance(connection, GuardedProtocol):
        connection.request_started()
    try:
        return await _guarded(request, handler, token, basic)
    finally:
        if isinstance(connection, GuardedProtocol):
            connection.request_finished()


async def _guarded(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                   token: str, basic: str) -> web.StreamResponse:
    response: web.StreamResponse
    if (token or basic) and request.path.startswith(PROTECTED) and \
            not authorized(request.headers.get("Authorization", ""), token, basic):
        response = _error(401, "missing or wrong credentials")
        response.headers["WWW-Authenticate"] = 'Bearer realm="caretaker"' if token else 'Basic realm="caretaker"'
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if request.path == "/alerts":
                request.app[METRICS_KEY].request_count(exc.status)
            raise
        except sqlite3.Error as err:
            # Nothing of the request was recorded (its transaction rolled back);
            # Alertmanager retries on 5xx.
            log.error("state file unavailable, answering 503: %s", err)
            response = _error(503, f"state file unavailable, retry later: {err}")
    if request.path == "/alerts":
        request.app[METRICS_KEY].request_count(response.status)
    return response


async def read_notification(request: web.Request) -> Notification | web.Response:
    """The validated payload, or the 4xx response that says what is wrong with it."""
    executor = request.app[EXECUTOR_KEY]
    if request.content_type != "application/json":
        return _error(415, f"content type must be application/json, not {request.content_type or 'none'}")
    limit = executor.config.receiver.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"body of {request.content_length} bytes is over the limit of {limit}")
    timeout = executor.config.receiver.body_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"body is over the limit of {limit} bytes")
    except TimeoutError:
        return _error(408, f"body not received within {timeout:g}s")
    try:
        # pydantic-core parses and validates in one pass, and refuses JSON nested over
        # 200 levels ("recursion limit exceeded") before any of it reaches Python.
        notification = Notification.model_validate_json(raw)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            return _error(400, f"body is not valid JSON: {errors[0]['msg'][:200]}")
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        return _error(400, f"not an Alertmanager webhook payload (version 4): {problems}")
    return notification


async def post_alerts(request: web.Request) -> web.Response:
    notification = await read_notification(request)
    if isinstance(notification, web.Response):
        return notification
    try:
        admission = await request.app[EXECUTOR_KEY].admit(notification.alerts)
    except QueueFull as err:
        return _error(503, f"too busy, retry later: {err}")
    except SharedStateError as err:
        log.error("shared state (Redis) unavailable; answering 503 so Alertmanager retries: %s", err)
        return _error(503, "shared state unavailable, retry later")
    return web.Response(body=admission.as_json_bytes(), content_type="application/json")


async def post_plan(request: web.Request) -> web.Response:
    notification = await read_notification(request)
    if isinstance(notification, web.Response):
        return notification
    executor = request.app[EXECUTOR_KEY]
    plan = await executor.plan(notification.alerts)
    for item, alert in zip(plan, notification.alerts, strict=True):
        item["host"] = alert.labels.get(HOST_LABEL)
    recv = executor.config.receiver
    return web.json_response({"status": "success", "host": recv.host, "fleet": recv.fleet, "data": plan})


async def post_reset(request: web.Request) -> web.Response:
    executor = request.app[EXECUTOR_KEY]
    name = request.match_info["name"]
    if name not in executor.config.services:
        return _error(404, f"no service named {name[:100]!r} in the config")
    was = await executor.reset(name, "reset by an operator")
    return web.json_response({"status": "success", "service_name": name, "was_exhausted": was})


def _service(request: web.Request) -> str | web.Response:
    name = request.match_info["name"]
    if name not in request.app[EXECUTOR_KEY].config.services:
        return _error(404, f"no service named {name[:100]!r} in the config")
    return name


async def post_pause(request: web.Request) -> web.Response:
    name = _service(request)
    if isinstance(name, web.Response):
        return name
    body: object = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body must be JSON: {\"duration\": \"10m\", \"reason\": \"...\"} (both optional)")
    if not isinstance(body, dict) or not body.keys() <= {"duration", "reason"}:
        return _error(400, "body must be a JSON object with optional keys duration and reason")
    duration = None
    if body.get("duration") not in (None, "", 0):
        try:
            duration = float(parse_duration(body["duration"]))
        except ValueError as err:
            return _error(400, f"duration: {err}")
        if duration <= 0:
            return _error(400, "duration must be positive")
    reason = str(body.get("reason") or "paused by an operator")
    until = await request.app[EXECUTOR_KEY].pause(name, duration, reason)
    return web.json_response({"status": "success", "service_name": name, "paused_until": until})


async def post_resume(request: web.Request) -> web.Response:
    name = _service(request)
    if isinstance(name, web.Response):
        return name
    was = await request.app[EXECUTOR_KEY].resume(name)
    return web.json_response({"status": "success", "service_name": name, "was_paused": was})


async def get_problems(request: web.Request) -> web.Response:
    state = request.query.get("state", "")
    if state not in ("", ProblemState.OPEN):
        return _error(400, f"state must be '{ProblemState.OPEN}' or absent")
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "100"))))
    except ValueError:
        return _error(400, "limit must be a whole number")
    executor = request.app[EXECUTOR_KEY]
    data = await executor.problems(request.query.get("service_name"), state == ProblemState.OPEN, limit)
    return web.json_response({"status": "success", "host": executor.config.receiver.host, "data": data})


async def get_remediations(request: web.Request) -> web.Response:
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "100"))))
    except ValueError:
        return _error(400, "limit must be a whole number")
    service = request.query.get("service_name")
    entries = await request.app[EXECUTOR_KEY].history(limit, service)
    return web.json_response({"status": "success", "data": [e.as_json() for e in entries]})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="OK\n")


async def backup_forever(keeper: BackupKeeper, interval: float) -> None:
    """Back up the declared files while they are valid, for restore_file."""
    while True:
        try:
            await asyncio.to_thread(keeper.run_once)
        except OSError as err:
            log.error("backing up declared files: %s", err)
        await asyncio.sleep(interval)


async def reap_forever(reaper: ChildReaper, interval: float = 2.0) -> None:
    """Collect the exit status of services the receiver started, so none lingers as a zombie."""
    while True:
        await asyncio.sleep(interval)
        reaper.reap()


async def watch_layout(state: SharedState, legacy_prefix: str, services: list[str], started: float) -> None:
    """Every :data:`LAYOUT_CHECK_SECONDS`, an ERROR for each repair that a receiver keeping
    its Redis keys without the host (``<legacy_prefix>repairs:<service>``: a receiver of an
    earlier version, outside fleet mode) started after this one (``started``, Unix
    seconds): such a receiver shares no lock nor budget with this one, so if it serves
    this host, both may repair one service at once. Redis errors are the executor's to
    report; here they only skip a look."""
    told: dict[str, int] = {}
    while True:
        await asyncio.sleep(LAYOUT_CHECK_SECONDS)
        try:
            found = await state.legacy_repairs(legacy_prefix, services, started)
        except SharedStateError as err:
            log.debug("key layout check skipped: %s", err)
            continue
        for service, count in found.items():
            if count > told.get(service, 0):
                log.error("%d repair(s) of %s since this receiver started are recorded under %srepairs:%s, the "
                          "Redis keys of a receiver that keeps them without its host (an earlier version, outside "
                          "fleet mode); this one keeps them under %s. If that receiver serves this host (the other "
                          "of its pair), the two share no lock nor budget and may repair %s at once: stop it, "
                          "upgrade it, start it (docs/fleet.md, \"A receiver pair per host\")",
                          count - told.get(service, 0), service, legacy_prefix, service, state.prefix, service)
            told[service] = count


class QuietProtocolErrors(logging.Filter):
    """At most one WARNING line per ``interval`` seconds, with a count, for what a
    client's malformed request or a connection flood makes aiohttp and asyncio log
    (a traceback per bad request, "accept() out of system resource" per attempt):
    never a traceback, never a flood. Other records pass unchanged."""

    NOISE = ("Error handling request", "socket.accept() out of system resource", "Bad request", "BadHttpMessage",
             "BadStatusLine", "LineTooLong", "InvalidHeader")

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self.suppressed = 0
        self._last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        kind = record.exc_info[1] if record.exc_info else None
        noisy = any(n in text for n in self.NOISE) or isinstance(kind, (aiohttp.http_exceptions.HttpProcessingError,
                                                                         OSError))
        if not noisy:
            return True
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        what = f"{type(kind).__name__}: {str(kind).strip()[:120]}" if kind is not None else text[:160]
        record.msg, record.args = "client or connection error (%d more in the last %gs): %s", (
            self.suppressed, self.interval, what)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = record.stack_info = None
        self.suppressed = 0
        self._last = now
        return True


def quiet_protocol_errors(interval: float = 10.0) -> QuietProtocolErrors:
    """Install :class:`QuietProtocolErrors` on aiohttp's server and asyncio's loggers."""
    quiet = QuietProtocolErrors(interval)
    for name in ("aiohttp.server", "asyncio"):
        logging.getLogger(name).addFilter(quiet)
    return quiet


class _Collect:
    """A collector from a function (prometheus_client wants an object with collect())."""

    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.collect = collect


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def create_app(config: Config, reader: ProcReader | None = None, dry_run: bool = False,
               clock: Callable[[], float] = time.time) -> web.Application:
    """The receiver app. ``clock`` (Unix seconds) is the executor's: tests move it on
    instead of waiting out a cooldown. Raises ``ConfigError`` if the token cannot be
    read, or if it would listen beyond loopback without auth."""
    recv = config.receiver
    token = read_secret(recv.bearer_token, config.base_dir) if recv.bearer_token else ""
    basic = ""
    if recv.basic_auth is not None:
        password = read_secret(recv.basic_auth.password, config.base_dir)
        basic = base64.b64encode(f"{recv.basic_auth.username}:{password}".encode()).decode()
    if not (token or basic) and not _is_loopback(recv.listen_address):
        raise ConfigError("config", [f"receiver.listen_address ({recv.listen_address}) is not loopback: "
                                     "set receiver.bearer_token or receiver.basic_auth"])
    app = web.Application(middlewares=[guard], client_max_size=recv.max_body_bytes)
    registry = CollectorRegistry()
    app[REGISTRY_KEY] = registry
    app[METRICS_KEY] = receiver_metrics = ReceiverMetrics(registry, config)
    app[TOKEN_KEY] = token
    app[BASIC_KEY] = basic
    guards: list[ConnectionGuard] = []
    app[GUARD_KEY] = guards

    def connections() -> Iterator[Metric]:
        closed = CounterMetricFamily("caretaker_receiver_connections_closed",
                                     "Client connections the receiver closed: over max_connections, or too slow "
                                     "to send a request (header_timeout).", labels=["reason"])
        for reason in ("over_limit", "header_timeout"):
            closed.add_metric([reason], sum(g.closed[reason] for g in guards))
        live = GaugeMetricFamily("caretaker_receiver_connections", "Client connections open now.")
        live.add_metric([], sum(len(g.live) for g in guards))
        # Not `host`: that is the target label Prometheus adds; the rule CaretakerReceiverHostMismatch
        # compares the two.
        info = GaugeMetricFamily("caretaker_receiver_info", "The host this receiver repairs (receiver.host) and "
                                 "whether it is in fleet mode; always 1.", labels=["receiver_host", "fleet"])
        info.add_metric([recv.host, str(recv.fleet).lower()], 1)
        yield from (closed, live, info)

    registry.register(_Collect(connections))

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state_file = config.resolve(recv.state_file)
        store = Store(state_file, recv.state_reserve_bytes)
        proc_reader = reader or ProcReader()
        async with aiohttp.ClientSession(headers={"User-Agent": "caretaker-receiver"}) as session:
            executors: list[Executor] = []

            def child_exited(name: str, child: object) -> None:
                # A service the receiver started has exited: look at its problems now.
                if executors and name in config.services:
                    executors[0].wake(name)

            reaper = ChildReaper(on_exit=child_exited)
            backups = BackupKeeper(config, state_file.parent / "backups")
            evidence = EvidenceKeeper(config, state_file.parent / "evidence", proc_reader)
            family = FamilyTracker(proc_reader, config.services)
            ctx = ActionContext(config, session, proc_reader, reaper, evidence=evidence, backups=backups,
                                family=family)
            # The one place where a lone receiver and an HA pair differ (receiver/state.py).
            state: RepairState = LocalState(store)
            redis_client = None
            shared: SharedState | None = None
            if recv.shared_state is not None:
                spec = recv.shared_state
                # A bounded pool: concurrent notifications wait for one of its connections
                # (up to the command timeout) instead of each opening a socket of its own,
                # which a flood would turn into as many descriptors as max_connections.
                redis_client = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool(
                    host=spec.host, port=spec.port, db=spec.db,
                    password=read_secret(spec.password, config.base_dir) if spec.password else None,
                    socket_timeout=5, socket_connect_timeout=5, max_connections=SHARED_STATE_CONNECTIONS, timeout=5))
                # Each host its own keys, in either mode: a pair meets on them, hosts sharing a Redis do not.
                shared = SharedState(redis_client, key_prefix(spec.key_prefix, recv.host), spec.dedupe_ttl, store)
                state = shared
            executor = Executor(config, store, state, ctx, receiver_metrics, clock=clock, dry_run=dry_run)
            executors.append(executor)
            ctx.may_start = executor.may_start
            app[EXECUTOR_KEY] = executor
            await executor.start()
            background = [asyncio.create_task(reap_forever(reaper)),
                          asyncio.create_task(executor.track_forever()),
                          asyncio.create_task(backup_forever(backups, recv.backup_interval)),
                          asyncio.create_task(executor.watch_exhausted()),
                          asyncio.create_task(executor.checkpoint_forever())]
            if shared is not None and recv.shared_state is not None:
                background.append(asyncio.create_task(
                    watch_layout(shared, recv.shared_state.key_prefix, list(config.services), time.time())))
            yield
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await executor.stop()
            reaper.reap()
            if redis_client is not None:
                await redis_client.aclose()
        store.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/alerts", post_alerts)
    app.router.add_get("/api/v1/remediations", get_remediations)
    app.router.add_post("/api/v1/plan", post_plan)
    app.router.add_post("/api/v1/services/{name}/reset", post_reset)
    app.router.add_post("/api/v1/services/{name}/pause", post_pause)
    app.router.add_post("/api/v1/services/{name}/resume", post_resume)
    app.router.add_get("/api/v1/problems", get_problems)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("caretaker-receiver", "Alertmanager webhook receiver that repairs services.")
    parser.add_argument("--dry-run", action="store_true", help="decide and record, but repair nothing")
    args = parser.parse_args(argv)
    config = load_or_exit(args.config, args.check_config, refusals=start_problems, warn=True)
    setup_logging(args.log_level)
    quiet_protocol_errors()
    try:
        app = create_app(config, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"{err}", file=sys.stderr)
        raise SystemExit(2) from err
    host, port = config.receiver.listen_address, config.receiver.port
    tls = None
    if config.receiver.tls is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(config.resolve(config.receiver.tls.cert_file),
                                config.resolve(config.receiver.tls.key_file))
        except (OSError, ssl.SSLError) as err:
            print(f"receiver.tls: cannot load the certificate or key: {err}", file=sys.stderr)
            raise SystemExit(2) from err
    auth = " and ".join(k for k, v in (("bearer token", app[TOKEN_KEY]), ("basic auth", app[BASIC_KEY])) if v)
    log.info("caretaker receiver listening on %s://%s:%d/alerts (auth: %s%s)", "https" if tls else "http", host,
             port, auth or "none, loopback only", ", DRY RUN" if args.dry_run else "")
    recv = config.receiver
    # The guard closes idle and slow connections after header_timeout; aiohttp's own keep-alive
    # timer is only a backstop.
    asyncio.run(serve(app, host, port, tls, recv.max_connections, recv.header_timeout, 2 * recv.header_timeout + 5))


if __name__ == "__main__":
    main()
