"""caretaker's configuration: one YAML file (``caretaker.yml``) for both programs.

Pipeline: YAML (safe loader, parsed once, with line numbers kept) -> pydantic models
with ``extra="forbid"`` -> cross-checks -> a frozen :class:`Config` the rest of the
code uses. Every problem is reported with its place in the file, e.g.::

    caretaker.yml: services.redis.probes[0].timeout (line 14): must not be negative

and :func:`load_config` raises :class:`ConfigError` carrying all problems at once.
Durations are Prometheus-style strings (``500ms``, ``10s``, ``1m30s``) or plain
numbers of seconds. Secrets (tokens) are never inline: they are read from a file
or an environment variable named in the config.

One module per job:

- :mod:`.types`: units (durations, bytes), reusable field types, the base model;
- :mod:`.service`, :mod:`.probes`, :mod:`.remediation`, :mod:`.claims`: ``services.<name>``;
- :mod:`.receiver`: the ``receiver`` section; :mod:`.matchers`: Alertmanager's
  matcher grammar for its ``rules``;
- :mod:`.model`: the whole file (:class:`Config`) and checks across services;
- :mod:`.secrets`: secrets and :func:`read_secret`;
- :mod:`.yaml_marks`: YAML with the line of every key; :mod:`.errors`: the places
  errors name; :mod:`.loader`: :func:`load_config`, :func:`parse_config`;
- :mod:`.machine`: programs and directories the config names, looked up on this machine;
- :mod:`.schema`: the JSON Schema; :mod:`.docs`: docs/configuration.md and
  docs/caretaker.schema.json (``python -m exporter.config.docs``, ``make docs``).
"""

from __future__ import annotations

from .claims import Claims, ClaimsRelease
from .errors import ConfigError
from .loader import load_config, parse_config
from .machine import machine_problems
from .matchers import Matcher, parse_matchers
from .model import DEFAULT_EXPORTER_PORT, Config, ExporterConfig, dependency_order, dependency_problems
from .probes import ExecProbe, HttpProbe, PostgresProbe, Probe, RedisConnection, RedisProbe, TcpProbe
from .receiver import (
    DEFAULT_RECEIVER_PORT,
    HOST_LABEL,
    Attempts,
    Backoff,
    BasicAuth,
    Confirm,
    Evidence,
    ReceiverConfig,
    RedisState,
    RepairRule,
    Retention,
    TlsConfig,
)
from .remediation import CleanRule, ExecAction, HttpAction, Remediation, RotateLogs, SignalAction, Vacuum
from .schema import json_schema, schema_text
from .secrets import Secret, read_secret
from .service import (
    DirectoryCheck,
    FileCheck,
    HealthWeights,
    Heartbeat,
    Limits,
    LogPattern,
    LogWatch,
    Match,
    Processes,
    ResourceLimits,
    ServiceConfig,
    Start,
    Stop,
    Supervisor,
)
from .types import (
    PROBE_TYPES,
    REMEDIATION_ACTIONS,
    Action,
    ListenConfig,
    Name,
    Port,
    PositiveSeconds,
    Regex,
    Seconds,
    SignalName,
    parse_duration,
)

__all__ = [
    "DEFAULT_EXPORTER_PORT",
    "DEFAULT_RECEIVER_PORT",
    "HOST_LABEL",
    "PROBE_TYPES",
    "REMEDIATION_ACTIONS",
    "Action",
    "Attempts",
    "Backoff",
    "BasicAuth",
    "Claims",
    "ClaimsRelease",
    "CleanRule",
    "Config",
    "ConfigError",
    "Confirm",
    "DirectoryCheck",
    "Evidence",
    "ExecAction",
    "ExecProbe",
    "ExporterConfig",
    "FileCheck",
    "HealthWeights",
    "Heartbeat",
    "HttpAction",
    "HttpProbe",
    "Limits",
    "ListenConfig",
    "LogPattern",
    "LogWatch",
    "Match",
    "Matcher",
    "Name",
    "Port",
    "PositiveSeconds",
    "PostgresProbe",
    "Probe",
    "Processes",
    "ReceiverConfig",
    "RedisConnection",
    "RedisProbe",
    "RedisState",
    "Regex",
    "Remediation",
    "RepairRule",
    "ResourceLimits",
    "Retention",
    "RotateLogs",
    "Seconds",
    "Secret",
    "ServiceConfig",
    "SignalAction",
    "SignalName",
    "Start",
    "Stop",
    "Supervisor",
    "TcpProbe",
    "TlsConfig",
    "Vacuum",
    "dependency_order",
    "dependency_problems",
    "json_schema",
    "load_config",
    "machine_problems",
    "parse_config",
    "parse_duration",
    "parse_matchers",
    "read_secret",
    "schema_text",
]
