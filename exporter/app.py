"""The exporter's web app: ``GET /metrics`` (Prometheus text format), ``GET /-/healthy``.

Each scrape runs one collection bounded by the scrape timeout that Prometheus sends
in ``X-Prometheus-Scrape-Timeout-Seconds`` (less a margin for rendering), capped by
``exporter.max_scrape_timeout`` in the config.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .cli import base_parser, load_or_exit, setup_logging
from .collector import Scraper, ServiceCollector
from .config import Config
from .procfs import ProcReader

__all__ = ["REGISTRY_KEY", "SCRAPER_KEY", "create_app", "main"]

log = logging.getLogger(__name__)

SCRAPER_KEY = web.AppKey("scraper", Scraper)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
RENDER_MARGIN_SECONDS = 0.25


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


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="OK\n")


async def index(request: web.Request) -> web.Response:
    names = ", ".join(request.app[SCRAPER_KEY].config.services)
    return web.Response(content_type="text/html", text=(
        "<html><head><title>caretaker exporter</title></head><body><h1>caretaker exporter</h1>"
        f"<p>Watching: {names}</p><p><a href='/metrics'>Metrics</a></p></body></html>"))


def create_app(config: Config, reader: ProcReader | None = None) -> web.Application:
    """The exporter app; ``reader`` lets tests point it at a fixture ``/proc`` tree."""
    app = web.Application()
    registry = CollectorRegistry()
    scraper = Scraper(config, registry, reader)
    registry.register(ServiceCollector(scraper))
    app[SCRAPER_KEY] = scraper
    app[REGISTRY_KEY] = registry

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(headers={"User-Agent": "caretaker-exporter"}) as session:
            scraper.session = session
            yield

    app.cleanup_ctx.append(client_session)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/", index)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("caretaker-exporter", "Prometheus exporter for locally-run services.")
    args = parser.parse_args(argv)
    config = load_or_exit(args.config, args.check_config)
    setup_logging(args.log_level)
    host, port = config.exporter.listen_address, config.exporter.port
    log.info("caretaker exporter listening on http://%s:%d/metrics (%d services)", host, port,
             len(config.services))
    web.run_app(create_app(config), host=host, port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
