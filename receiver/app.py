"""The receiver's web app.

- ``POST /alerts``: Alertmanager's webhook (payload version 4). Answers at once, after
  validating, deduplicating and queueing: 200 with counts; 400 bad JSON or shape (with
  the reason); 401 missing/wrong bearer token; 413 body over ``receiver.max_body_bytes``;
  415 not ``application/json``; 503 when too many repairs are pending (Alertmanager
  retries on 5xx, never on 4xx).
- ``GET /api/v1/remediations?limit=N&service_name=S``: the audit trail, newest first.
- ``GET /metrics``: the receiver's own metrics. ``GET /-/healthy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from exporter.cli import base_parser, load_or_exit, setup_logging
from exporter.config import Config, ConfigError, read_secret
from exporter.procfs import ProcReader

from .actions import ActionContext, ChildReaper
from .executor import Executor, QueueFull, ReceiverMetrics
from .payload import Notification
from .store import Store

__all__ = ["EXECUTOR_KEY", "create_app", "main"]

log = logging.getLogger(__name__)

EXECUTOR_KEY = web.AppKey("executor", Executor)
METRICS_KEY = web.AppKey("metrics", ReceiverMetrics)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
TOKEN_KEY = web.AppKey("token", str)
MAX_JSON_DEPTH = 32
PROTECTED = ("/alerts", "/api/")


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"status": "error", "error": reason}, status=status)


def _depth(value: object, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping early past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


@web.middleware
async def count_requests(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         ) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if request.path == "/alerts":
            metrics.requests.labels(str(exc.status)).inc()
        raise
    if request.path == "/alerts":
        metrics.requests.labels(str(response.status)).inc()
    return response


@web.middleware
async def check_auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                     ) -> web.StreamResponse:
    token = request.app[TOKEN_KEY]
    if token and request.path.startswith(PROTECTED):
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            response = _error(401, "missing or wrong bearer token")
            response.headers["WWW-Authenticate"] = 'Bearer realm="caretaker"'
            return response
    return await handler(request)


async def post_alerts(request: web.Request) -> web.Response:
    executor = request.app[EXECUTOR_KEY]
    if request.content_type != "application/json":
        return _error(415, f"content type must be application/json, not {request.content_type or 'none'}")
    limit = executor.config.receiver.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"body of {request.content_length} bytes is over the limit of {limit}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"body is over the limit of {limit} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        return _error(400, f"body is not valid JSON: {str(err)[:200]}")
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return _error(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        notification = Notification.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                             for e in err.errors()[:5])
        return _error(400, f"not an Alertmanager webhook payload (version 4): {problems}")
    try:
        admission = await executor.admit(notification.alerts)
    except QueueFull as err:
        return _error(503, f"too busy, retry later: {err}")
    return web.json_response({"status": "success", **admission.as_json()})


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


async def reap_forever(reaper: ChildReaper, interval: float = 2.0) -> None:
    """Collect the exit status of services the receiver started, so none lingers as a zombie."""
    while True:
        await asyncio.sleep(interval)
        reaper.reap()


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def create_app(config: Config, reader: ProcReader | None = None, dry_run: bool = False) -> web.Application:
    """The receiver app. Raises ``ConfigError`` if the token cannot be read, or if it
    would listen beyond loopback without auth."""
    recv = config.receiver
    token = read_secret(recv.bearer_token, config.base_dir) if recv.bearer_token else ""
    if not token and not _is_loopback(recv.listen_address):
        raise ConfigError("config", [f"receiver.listen_address ({recv.listen_address}) is not loopback: "
                                     "set receiver.bearer_token"])
    app = web.Application(middlewares=[count_requests, check_auth], client_max_size=recv.max_body_bytes)
    registry = CollectorRegistry()
    app[REGISTRY_KEY] = registry
    app[METRICS_KEY] = receiver_metrics = ReceiverMetrics(registry, config)
    app[TOKEN_KEY] = token

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = Store(config.resolve(recv.state_file))
        async with aiohttp.ClientSession(headers={"User-Agent": "caretaker-receiver"}) as session:
            reaper = ChildReaper()
            ctx = ActionContext(config, session, reader or ProcReader(), reaper)
            executor = Executor(config, store, ctx, receiver_metrics, dry_run=dry_run)
            app[EXECUTOR_KEY] = executor
            await executor.start()
            reaping = asyncio.create_task(reap_forever(reaper))
            yield
            reaping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaping
            await executor.stop()
            reaper.reap()
        store.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/alerts", post_alerts)
    app.router.add_get("/api/v1/remediations", get_remediations)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("caretaker-receiver", "Alertmanager webhook receiver that repairs services.")
    parser.add_argument("--dry-run", action="store_true", help="decide and record, but repair nothing")
    args = parser.parse_args(argv)
    config = load_or_exit(args.config, args.check_config)
    setup_logging(args.log_level)
    try:
        app = create_app(config, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"{err}", file=sys.stderr)
        raise SystemExit(2) from err
    host, port = config.receiver.listen_address, config.receiver.port
    log.info("caretaker receiver listening on http://%s:%d/alerts (auth: %s%s)", host, port,
             "bearer token" if app[TOKEN_KEY] else "none, loopback only", ", DRY RUN" if args.dry_run else "")
    web.run_app(app, host=host, port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
