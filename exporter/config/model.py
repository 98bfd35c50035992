"""The whole file: :class:`Config` (``exporter``, ``receiver``, ``health_weights``,
``services``) and the checks across services (heartbeat names, ``depends_on``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr

from .errors import Lines, describe
from .receiver import ReceiverConfig
from .service import HealthWeights, Heartbeat, ServiceConfig
from .types import (
    Bytes,
    FilePath,
    ListenConfig,
    Model,
    Name,
    Port,
    PositiveSeconds,
    Problem,
    base_dir_from,
    resolve_path,
)

__all__ = ["DEFAULT_EXPORTER_PORT", "Config", "ExporterConfig", "dependency_order", "dependency_problems"]

DEFAULT_EXPORTER_PORT = 8930


class ExporterConfig(ListenConfig):
    """The Prometheus exporter (``caretaker-exporter``)."""

    port: Port = DEFAULT_EXPORTER_PORT
    """TCP port of ``/metrics`` and the heartbeat endpoint."""
    max_scrape_timeout: PositiveSeconds = 10.0
    """Upper bound on one collection, also when Prometheus allows more."""
    state_file: FilePath = "caretaker-exporter-state.json"
    """Heartbeats, kept across restarts (relative to the config file's directory)."""
    log_read_limit_bytes: Bytes = Field(default=8 * 1024 * 1024, ge=4096)
    """At most this much of each log file is read per collection; the rest waits."""


class Config(Model):
    """caretaker's configuration (``caretaker.yml``), read by both programs.

    Validate it with ``model_validate(data, context={"base_dir": DIR, "lines": LINES})``
    (:func:`~exporter.config.parse_config` does): ``base_dir`` is the config file's
    directory, against which relative paths resolve (default: the working directory);
    ``lines`` maps key paths to their lines, for :meth:`place`."""

    exporter: ExporterConfig = ExporterConfig()
    """The exporter's settings."""
    receiver: ReceiverConfig = ReceiverConfig()
    """The receiver's settings."""
    health_weights: HealthWeights = HealthWeights()
    """Weights of the health score's parts, for every service that sets none."""
    services: dict[Name, ServiceConfig] = Field(min_length=1)
    """The services to watch and repair, by name (the ``service_name`` label)."""
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _lines: Mapping[tuple[Any, ...], int] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._base_dir = base_dir_from(context)
        if isinstance(context, Mapping) and context.get("lines") is not None:
            self._lines = context["lines"]

    @property
    def base_dir(self) -> Path:
        """Directory of the config file; relative paths in it are resolved against it."""
        return self._base_dir

    def cross_check(self) -> Iterator[Problem]:
        seen: dict[str, str] = {}
        for service, cfg in self.services.items():
            for i, hb in enumerate(cfg.heartbeats):
                if hb.name in seen:
                    yield (("services", service, "heartbeats", i, "name"),
                           f"heartbeat {hb.name!r} of {service} is also one of {seen[hb.name]}; "
                           "heartbeat names must be unique")
                seen[hb.name] = service
        yield from dependency_problems(self)

    def heartbeat(self, name: str) -> tuple[str, Heartbeat] | None:
        """``(service, heartbeat)`` for a heartbeat name, or ``None``."""
        for service, cfg in self.services.items():
            for hb in cfg.heartbeats:
                if hb.name == name:
                    return service, hb
        return None

    def resolve(self, path: str) -> Path:
        """``path`` made absolute against the config file's directory."""
        return resolve_path(self.base_dir, path)

    def place(self, loc: tuple[Any, ...]) -> str:
        """Where ``loc`` (``("services", "redis", "start", "argv", 0)``) is in the file, as
        errors name it: ``services.redis.start.argv[0] (line 35)``."""
        lines: Lines = self._lines
        return describe(loc, lines)

    def weights_for(self, service: str) -> HealthWeights:
        return self.services[service].health_weights or self.health_weights


def dependency_problems(config: Config) -> list[tuple[tuple[str | int, ...], str]]:
    """``depends_on`` cross-checks: every name is a service, none is the service itself,
    and there is no cycle (one depth-first search: linear in services and edges).
    Returns ``(location, message)`` for each problem."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    for name, cfg in config.services.items():
        for i, dep in enumerate(cfg.depends_on):
            if dep == name:
                out.append((("services", name, "depends_on", i), "a service cannot depend on itself"))
            elif dep not in config.services:
                out.append((("services", name, "depends_on", i), f"no service named {dep!r}"))
    state: dict[str, int] = {}  # absent: not seen; 1: on the current path; 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in config.services[node].depends_on:
            if dep not in config.services or dep == node:
                continue
            if state.get(dep) == 1:  # back to a service on the path: a cycle
                cycle = path[path.index(dep):]
                first = cycle[0]
                index = config.services[first].depends_on.index(cycle[1] if len(cycle) > 1 else dep)
                out.append((("services", first, "depends_on", index),
                            f"dependency cycle: {' -> '.join((*cycle, first))}"))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for name in config.services:
        if name not in state:
            visit(name)
    return out


def dependency_order(config: Config) -> list[str]:
    """Service names with every service after the services it depends on (stable)."""
    done: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in done or name in seen:
            return
        for dep in config.services[name].depends_on:
            if dep in config.services:
                visit(dep, (*seen, name))
        done.append(name)

    for name in config.services:
        visit(name, ())
    return done
