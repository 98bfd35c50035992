"""The ``receiver`` section: where the webhook listens, how it authenticates, where it
keeps its state, and the schedule of repairs (cooldown, budget, backoff, confirmation)."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

from pydantic import Field, PrivateAttr, field_validator

from .matchers import Matcher, parse_matchers
from .secrets import Secret
from .types import Action, Bytes, DocDefault, FilePath, ListenConfig, Model, Port, PositiveSeconds, Seconds

__all__ = [
    "DEFAULT_RECEIVER_PORT",
    "HOST_LABEL",
    "Attempts",
    "Backoff",
    "BasicAuth",
    "Confirm",
    "Evidence",
    "ReceiverConfig",
    "RedisState",
    "RepairRule",
    "Retention",
    "TlsConfig",
]

DEFAULT_RECEIVER_PORT = 8931
HOST_LABEL = "host"
"""The alert label that names the host an alert is about: a target label Prometheus sets
(docs/fleet.md). A contract, like ``service_name``: the rules, the routes, the inhibit
rules and the dashboards use this name."""
HostName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Attempts(Model):
    """The repair budget of a service: past it the service is *exhausted* (an ERROR log,
    ``caretaker_remediation_attempts_exhausted``, ``CaretakerRepairsExhausted``) and
    repairs go on spaced out by ``backoff``."""

    max: int = Field(default=3, ge=1)
    """Repairs of one service within ``window``."""
    window: PositiveSeconds = 900.0
    """The sliding window the budget counts repairs in."""
    healthy_for: PositiveSeconds = 600.0
    """An exhausted service is repaired again once it has been healthy this long."""


class Retention(Model):
    """How long the audit trail keeps its entries (and closed problems)."""

    max_age: PositiveSeconds = 30 * 86400.0
    """Entries older than this go (never those of open problems, nor repairs within the
    attempt window, which the budget counts)."""
    max_entries: int = Field(default=100_000, ge=1000)
    """At most this many entries; the oldest go first."""


class Confirm(Model):
    """How the receiver confirms, before it acts, that a probe failure is still there."""

    probe_failures: int = Field(default=3, ge=1, le=20)
    """A failing probe must fail this many times in a row before a service whose
    processes run is stopped."""
    window: Seconds = 5.0
    """...spread over at least this many seconds, so that a stall (a long GC pause, an
    fsync, a slow command) is not taken for a freeze."""
    interval: PositiveSeconds = 0.25
    """Seconds between the probes when every process of the service is stopped (state
    T, e.g. SIGSTOP): such a process cannot answer until continued, so no window is
    waited (3 probes with a 1 s timeout take about 1.5 s)."""


class Backoff(Model):
    """Repairs after the attempt budget is spent: not given up, but spaced out."""

    initial: PositiveSeconds = 300.0
    """Seconds from the end of the repair that spent the budget to the next try."""
    max: PositiveSeconds = 3600.0
    """The delay doubles after each further failed try, up to this."""

    def cross_check(self) -> Iterator[str]:
        if self.max < self.initial:
            yield f"max ({self.max:g}s) is less than initial ({self.initial:g}s)"


class BasicAuth(Model):
    """HTTP basic authentication that Alertmanager (and caretakerctl) must send."""

    username: str = Field(examples=["alertmanager"])
    """User name."""
    password: Secret = Field(examples=[{"env": "CARETAKER_PASSWORD"}])
    """Password, from a file or an environment variable."""


class TlsConfig(Model):
    """Serve HTTPS with this certificate and key (PEM)."""

    cert_file: FilePath = Field(examples=["certs/receiver.pem"])
    """Certificate chain (PEM)."""
    key_file: FilePath = Field(examples=["certs/receiver.key"])
    """Private key (PEM)."""


class Evidence(Model):
    """What the receiver keeps before a destructive repair (restart, stop, free_port)."""

    log_lines: int = Field(default=50, ge=0, le=10000)
    """The last lines of each of the service's logs (0: none)."""
    max_bytes: Bytes = Field(default=50 * 1024 * 1024, ge=0)
    """Total size of the evidence directory; the oldest files go first."""
    py_spy: bool = True
    """Dump Python stacks with py-spy (when installed) of Python processes about to be stopped."""


class RedisState(Model):
    """Redis shared by several receivers (HA): dedupe, per-service locks, budgets, cooldowns."""

    host: str = "127.0.0.1"
    """Host name or address of the Redis server."""
    port: Port = 6379
    """TCP port of the Redis server."""
    db: int = Field(default=0, ge=0)
    """Redis database number."""
    password: Secret | None = Field(default=None, examples=[{"file": "secrets/redis-password"}])
    """Password (``AUTH``), from a file or an environment variable."""
    key_prefix: str = "caretaker:"
    """Prefix of every key the receivers write (one per group of receivers that share services).
    ``receiver.host`` follows it in every key, in either mode (``caretaker:web-1:``): the two
    receivers of a host meet on the same keys, and the receivers of several hosts may share
    one Redis, each host with its own locks, budgets and cooldowns."""
    dedupe_ttl: PositiveSeconds = 7 * 86400.0
    """How long an alert (fingerprint, startsAt, status) is remembered as seen."""


class RepairRule(Model):
    """Alerts matching ``match`` (Alertmanager matcher syntax) get ``steps``, run in
    order, stopping at the first failure. The service is the alert's ``service_name``,
    and it must allow every step."""

    match: str = Field(examples=['alertname="CaretakerDiskFull"'])
    """Alertmanager matchers: ``name="value"``, ``!=``, ``=~``, ``!~`` (regexes anchored),
    comma-separated, optionally in braces."""
    steps: Annotated[tuple[Action, ...], Field(min_length=1)] = Field(examples=[["clean", "restart"]])
    """Actions run in order; the first that fails ends the repair."""
    _matchers: tuple[Matcher, ...] = PrivateAttr(default=())

    @field_validator("match")
    @classmethod
    def _parses(cls, value: str) -> str:
        parse_matchers(value)
        return value

    def model_post_init(self, context: Any, /) -> None:
        self._matchers = parse_matchers(self.match)  # parsed once: rules are checked for every alert

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self._matchers)


class ReceiverConfig(ListenConfig):
    """The webhook receiver (``caretaker-receiver``)."""

    host: HostName = Field(default_factory=socket.gethostname, examples=["web-1"],
                           json_schema_extra=DocDefault("the machine's host name (`hostname`)"))
    """This host's name, as the ``host`` label of its alerts gives it (a target label set in
    Prometheus's scrape config, docs/fleet.md). An alert whose ``host`` label names another
    host is recorded and skipped (``other_host``), never acted on, in either mode."""
    fleet: bool = Field(default=False, examples=[True])
    """Fleet mode: one Prometheus and Alertmanager serve many hosts, and every alert must
    carry the ``host`` label; one without it is recorded and skipped (``no_host``). Off (a
    single host): an alert without a ``host`` label is this host's."""
    port: Port = DEFAULT_RECEIVER_PORT
    """TCP port of the webhook, API and metrics."""
    bearer_token: Secret | None = Field(default=None, examples=[{"file": "secrets/receiver-token"}])
    """Token that Alertmanager (``credentials_file``) and caretakerctl must send."""
    basic_auth: BasicAuth | None = None
    """User and password that clients must send instead of (or beside) the token."""
    tls: TlsConfig | None = None
    """Serve HTTPS; none: HTTP."""
    alertmanager_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = Field(
        default=None, examples=["http://127.0.0.1:9093"])
    """Where to post CaretakerRepairsExhausted (Alertmanager's API v2); none: metric only."""
    evidence: Evidence = Evidence()
    """What is kept before a destructive repair."""
    backup_interval: PositiveSeconds = 60.0
    """How often valid declared files are backed up for restore_file."""
    shared_state: RedisState | None = None
    """Set when several receivers serve the same services (e.g. one per Alertmanager)."""
    rules: tuple[RepairRule, ...] = ()
    """Checked in order before the alert's ``remediation`` label; the first match wins."""
    silence_during_repair: bool = False
    """With ``alertmanager_url``: silence the service's alerts while it is restarted."""
    state_file: FilePath = "caretaker-state.sqlite"
    """SQLite file (relative to the config file's directory) for dedupe, audit, budgets."""
    state_reserve_bytes: Bytes = Field(default=4 * 1024 * 1024, ge=0)
    """Disk space held in ``<state_file>.reserve`` and given up when that disk is full,
    so the receiver can still record the alert that asks to clean it (0: none)."""
    max_body_bytes: Bytes = Field(default=1024 * 1024, ge=1024)
    """Largest request body accepted (a larger one is answered 413)."""
    max_connections: int = Field(default=256, ge=8, le=100_000)
    """Client connections at once; more are closed at once. The receiver needs about
    this many plus 112 descriptors (its own work, connections being accepted; 48 more
    per further listening address) and warns at start when its descriptor limit
    (LimitNOFILE) is lower."""
    header_timeout: PositiveSeconds = 10.0
    """A connection that has not sent a whole request head this long after it opened,
    or after its previous answer, is closed (slow or stalled clients, idle keep-alive)."""
    body_timeout: PositiveSeconds = 10.0
    """A request body not received within this is answered 408."""
    cooldown: Seconds = 60.0
    """Seconds after a repair of a service before another repair of it may start."""
    attempts: Attempts = Attempts()
    """The repair budget of each service."""
    audit_retention: Retention = Retention()
    """How long the audit trail is kept."""
    backoff: Backoff = Backoff()
    """Spacing of repairs once the budget is spent."""
    confirm: Confirm = Confirm()
    """How a probe failure is confirmed before a running service is stopped."""
    problem_ttl: PositiveSeconds = 13 * 3600.0
    """An open problem that no notification has refreshed for this long expires: a few
    of Alertmanager's ``repeat_interval`` for the receiver's route (its default is 4h;
    the shipped route resends every 10m)."""
    recheck_interval: PositiveSeconds = 1.0
    """Seconds between observations of a service whose problem waits (a dependency, a
    cleared condition); doubles while nothing changes, up to 30 s."""
    repair_timeout: PositiveSeconds = 300.0
    """Default deadline of one repair (see ``remediation.timeout``)."""
    track_interval: PositiveSeconds = 1.0
    """Seconds between the receiver's own scans of the services' processes and their
    children, kept so that leftovers of a dead incarnation can be stopped."""
    workers: int = Field(default=4, ge=1, le=64)
    """Services that may be looked at or repaired at the same time (a worker takes a
    slot before it looks, so that what it acts on is what it saw)."""

    def cross_check(self) -> Iterator[str]:
        if self.audit_retention.max_age < self.attempts.window:
            yield (f"audit_retention.max_age ({self.audit_retention.max_age:g}s) is shorter than "
                   f"attempts.window ({self.attempts.window:g}s), which counts repairs in the audit trail")
