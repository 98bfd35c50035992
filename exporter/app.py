"""The exporter's web app and command line.

- ``GET /metrics``: Prometheus text format. Each scrape runs one collection bounded by
  the timeout Prometheus sends in ``X-Prometheus-Scrape-Timeout-Seconds`` (less a
  margin for rendering), capped by ``exporter.max_scrape_timeout``.
- ``POST /heartbeat/{name}`` and ``POST /heartbeat/{name}/fail``, optional ``?pid=N``
  and ``&beats=N`` (the work-loop beats since the previous report, as
  :mod:`caretaker_client.heartbeat` sends them; counted for a heartbeat, not for a
  failure): feed a configured heartbeat (200), 404 for a name the config does not
  have, 400 for a bad pid or beats. See :mod:`exporter.heartbeats`.
- ``GET /-/healthy``.

``caretaker-exporter --once [--json]`` runs one collection and prints a status table
(or JSON), exiting 0 when every service is fully healthy, 1 otherwise (2: bad config).
``--processes [--json]`` prints each service's processes and why each matched
(:mod:`exporter.matches`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .cli import base_parser, load_or_exit, setup_logging
from .collector import Scraper, Snapshot
from .config import Config
from .heartbeats import SAVE_INTERVAL
from .matches import run_processes
from .procfs import ProcReader

__all__ = ["REGISTRY_KEY", "SCRAPER_KEY", "create_app", "main"]

log = logging.getLogger(__name__)

SCRAPER_KEY = web.AppKey("scraper", Scraper)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
RENDER_MARGIN_SECONDS = 0.25
MAX_BEATS = 2**53
"""Most beats one heartbeat report may vouch for (an exact float, for the counter)."""


def scrape_deadline(request: web.Request, cap: float) -> float:
    """Seconds this scrape may spend collecting."""
    header = request.headers.get("X-Prometheus-Scrape-Timeout-Seconds")
    try:
        allowed = float(header) - RENDER_MARGIN_SECONDS if header else cap
    except ValueError:
        allowed = cap
    return max(0.1, min(cap, allowed))


async def metrics(request: web.Request) -> web.Response:
    scraper = request.app[SCRAPER_KEY]
    await scraper.collect(scrape_deadline(request, scraper.config.exporter.max_scrape_timeout))
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _count(text: str, most: int) -> int | None:
    """``text`` as a number from 1 to ``most``, in ASCII digits only; ``None`` otherwise.
    (``str.isdigit()`` also says yes to ``²``, which ``int()`` refuses, and ``int()``
    reads other scripts' digits and refuses more than 4,300 of them: the length is
    bounded first.)"""
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(most))):
        return None
    value = int(text)
    return value if 0 < value <= most else None


async def heartbeat(request: web.Request) -> web.Response:
    scraper = request.app[SCRAPER_KEY]
    name = request.match_info["name"]
    if scraper.config.heartbeat(name) is None:
        return web.json_response({"status": "error", "error": f"no heartbeat named {name[:100]!r} in the config"},
                                 status=404)
    pid_text = request.query.get("pid")
    pid = None
    if pid_text is not None:
        pid = _count(pid_text, 2**22 - 1)
        if pid is None:
            return web.json_response({"status": "error", "error": "pid must be a positive process id"}, status=400)
    beats_text = request.query.get("beats")
    beats = 0
    if beats_text is not None:
        beats = _count(beats_text, MAX_BEATS) or 0
        if not beats:
            return web.json_response({"status": "error", "error": "beats must be a positive count of work-loop "
                                      f"beats since the previous report, at most {MAX_BEATS}"}, status=400)
    store = scraper.heartbeats
    if request.match_info.get("fail"):
        await asyncio.to_thread(store.fail, name, pid)
    else:
        await asyncio.to_thread(store.beat, name, pid, beats)
    return web.json_response({"status": "success"})


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="OK\n")


async def index(request: web.Request) -> web.Response:
    names = ", ".join(request.app[SCRAPER_KEY].config.services)
    return web.Response(content_type="text/html", text=(
        "<html><head><title>caretaker exporter</title></head><body><h1>caretaker exporter</h1>"
        f"<p>Watching: {names}</p><p><a href='/metrics'>Metrics</a></p></body></html>"))


async def _save_heartbeats(scraper: Scraper) -> None:
    while True:
        await asyncio.sleep(SAVE_INTERVAL)
        if scraper.heartbeats.dirty:
            try:
                await asyncio.to_thread(scraper.heartbeats.save)
            except OSError as err:
                log.error("cannot save heartbeat state: %s", err)


def create_app(config: Config, reader: ProcReader | None = None) -> web.Application:
    """The exporter app; ``reader`` lets tests point it at a fixture ``/proc`` tree."""
    app = web.Application(client_max_size=4096)
    registry = CollectorRegistry()
    scraper = Scraper(config, registry, reader)
    app[SCRAPER_KEY] = scraper
    app[REGISTRY_KEY] = registry

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(scraper.heartbeats.load)
        saver = asyncio.create_task(_save_heartbeats(scraper))
        async with aiohttp.ClientSession(headers={"User-Agent": "caretaker-exporter"}) as session:
            scraper.session = session
            yield
        saver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saver
        if scraper.heartbeats.dirty:
            await asyncio.to_thread(scraper.heartbeats.save)
        scraper.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/heartbeat/{name}", heartbeat)
    app.router.add_post("/heartbeat/{name}/{fail:fail}", heartbeat)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/", index)
    return app


# --- one-shot status -----------------------------------------------------------------------

async def collect_once(config: Config) -> Snapshot:
    """One collection, as a scrape would do it; logs are read from their last 64 KiB."""
    scraper = Scraper(config, CollectorRegistry(), logs_from_start=True)
    for followers in scraper.followers.values():
        for f in followers:
            f.tail_only(64 * 1024)
    scraper.heartbeats.load()
    try:
        async with aiohttp.ClientSession() as session:
            scraper.session = session
            return await scraper.collect(config.exporter.max_scrape_timeout)
    finally:
        scraper.close()


def paused_services(config: Config, now: float) -> dict[str, float | None]:
    """Services an operator paused in the receiver, with when the pause ends (None: until
    resumed), read from the receiver's state file (read-only; ``{}`` when it has none)."""
    import sqlite3  # noqa: PLC0415 - only --once reads it; the server never needs sqlite3 (1.3 MiB)

    path = config.resolve(config.receiver.state_file)
    if not path.is_file():
        return {}
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = db.execute("SELECT service_name, paused_until FROM services WHERE paused = 1").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return {}  # an older receiver's file, or one being migrated: nothing is known paused
    return {name: until for name, until in rows if until is None or until > now}


def status_rows(snap: Snapshot) -> list[dict[str, Any]]:
    now = time.time()
    paused = paused_services(snap.config, now)
    rows = []
    for name, cfg in snap.config.services.items():
        state = snap.services[name]
        beats = {hb: round(now - fed.last_seen, 1) if fed.last_seen else None for hb, fed in state.heartbeats.items()}
        rows.append({
            "service": name,
            "processes": len(state.processes),
            "expected": [cfg.processes.min, cfg.processes.max],
            "health": round(state.health, 3),
            "components": {k: round(v, 3) for k, v in state.components.items()},
            "failing_probes": {k: r.reason for k, r in state.probes.items() if not r.success},
            "heartbeat_age_seconds": beats,
            "recent_log_matches": {m.pattern: m.total for m in state.observed.log_matches if m.total},
            "paused": name in paused,
            "paused_until": paused.get(name),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'SERVICE':<16} {'PROCS':>7} {'HEALTH':>6}  {'FAILING PROBES':<24} {'HEARTBEAT AGE':<18} RECENT LOG ERRORS")
    for r in rows:
        procs = f"{r['processes']}/{r['expected'][0]}" + (f"-{r['expected'][1]}" if r["expected"][1] !=
                                                           r["expected"][0] else "")
        probes = ", ".join(f"{k} ({v})" for k, v in r["failing_probes"].items()) or "-"
        beats = ", ".join(f"{k} {'never' if v is None else f'{v:g}s'}" for k, v in
                          r["heartbeat_age_seconds"].items()) or "-"
        logs = ", ".join(f"{k} {v}" for k, v in r["recent_log_matches"].items()) or "-"
        name = r["service"]
        if r["paused"]:
            until = r["paused_until"]
            name += " (paused" + (f" until {time.strftime('%H:%M:%S', time.localtime(until))})" if until else ")")
        print(f"{name:<16} {procs:>7} {r['health']:>6.2f}  {probes:<24} {beats:<18} {logs}")


def run_once(config: Config, as_json: bool) -> int:
    rows = status_rows(asyncio.run(collect_once(config)))
    if as_json:
        print(json.dumps({"services": rows}, indent=2))
    else:
        print_table(rows)
    return 0 if all(r["health"] >= 1.0 for r in rows) else 1


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("caretaker-exporter", "Prometheus exporter for locally-run services.")
    parser.add_argument("--once", action="store_true",
                        help="collect once, print a status table and exit (0 all healthy, 1 not)")
    parser.add_argument("--processes", action="store_true",
                        help="print each service's processes and the rule of its match each one met, and exit")
    parser.add_argument("--json", action="store_true", help="with --once or --processes: print JSON")
    args = parser.parse_args(argv)
    config = load_or_exit(args.config, args.check_config, warn=True)
    setup_logging(args.log_level if not (args.once or args.processes) else "ERROR")
    if args.processes:
        raise SystemExit(run_processes(config, args.json))
    if args.once:
        raise SystemExit(run_once(config, args.json))
    host, port = config.exporter.listen_address, config.exporter.port
    log.info("caretaker exporter listening on http://%s:%d/metrics (%d services)", host, port,
             len(config.services))
    web.run_app(create_app(config), host=host, port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
