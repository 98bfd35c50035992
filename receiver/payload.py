"""Alertmanager's webhook payload (``version: "4"``) and the decision it leads to.

Format: https://prometheus.io/docs/alerting/latest/configuration/#webhook_config
(the JSON that ``notify/webhook/webhook.go`` in prometheus/alertmanager sends). We
accept what Alertmanager sends and may add in later versions, and validate strictly
only the fields we use: ``version``, ``status``, and per alert ``status``, ``labels``
(string values), ``startsAt`` (a timestamp) and ``fingerprint`` (a short token).
Everything else (annotations, endsAt, groupKey, truncatedAlerts...) is ignored.
"""

from __future__ import annotations

from datetime import UTC
from typing import Annotated, Literal, NamedTuple

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictStr

from exporter.config import HOST_LABEL, REMEDIATION_ACTIONS, Config

from .vocabulary import Reason

__all__ = ["SKIP_REASONS", "Alert", "Decision", "Notification", "decide"]

MAX_ALERTS = 1000
MAX_LABELS = 64
LabelName = Annotated[StrictStr, Field(min_length=1, max_length=256)]
LabelValue = Annotated[StrictStr, Field(max_length=4096)]


class _Accepting(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Alert(_Accepting):
    status: Literal["firing", "resolved"]
    labels: Annotated[dict[LabelName, LabelValue], Field(max_length=MAX_LABELS)]
    startsAt: AwareDatetime
    fingerprint: Annotated[StrictStr, Field(pattern=r"^[0-9A-Za-z]{1,64}$")]

    @property
    def starts_at_key(self) -> str:
        """``startsAt`` in one canonical text form (UTC, microseconds), for the dedupe key."""
        starts = self.startsAt
        if starts.utcoffset():
            starts = starts.astimezone(UTC)
        return starts.isoformat(timespec="microseconds")

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")


class Notification(_Accepting):
    version: Literal["4"]
    status: Literal["firing", "resolved"]
    alerts: Annotated[list[Alert], Field(max_length=MAX_ALERTS)]


SKIP_REASONS = tuple(reason.value for reason in Reason)
"""Every reason a decision can give for not repairing; a fixed set (a metric label).
See :class:`~receiver.vocabulary.Reason` for what each means."""

# decide() runs for every alert on the webhook's hot path and its reason goes into an
# SQLite row: plain values, bound once (see receiver.vocabulary).
_RESOLVED, _NO_SERVICE_NAME, _UNKNOWN_SERVICE, _NO_REMEDIATION, _UNKNOWN_ACTION, _ACTION_NOT_ALLOWED = (
    r.value for r in (Reason.RESOLVED, Reason.NO_SERVICE_NAME, Reason.UNKNOWN_SERVICE, Reason.NO_REMEDIATION,
                      Reason.UNKNOWN_ACTION, Reason.ACTION_NOT_ALLOWED))
_OTHER_HOST, _NO_HOST = Reason.OTHER_HOST.value, Reason.NO_HOST.value


class Decision(NamedTuple):
    """What to do about one alert: ``reason`` empty means queue a repair.

    A named tuple, not a dataclass: one is made per alert on the webhook's hot path.
    """

    service_name: str
    """The configured service, or ``""`` when the alert names none we know (bounded cardinality)."""
    action: str
    """The requested repair(s) if known, comma-separated, else ``""``."""
    reason: str
    """``""`` when a repair is queued, else a :class:`~receiver.vocabulary.Reason` (its plain value)."""

    @property
    def acts(self) -> bool:
        return not self.reason


def decide(alert: Alert, config: Config) -> Decision:
    """Whether ``alert`` asks for a repair this config allows. Pure; no I/O.

    ``receiver.rules`` are checked first (the first match gives the steps); otherwise
    the alert's ``remediation`` label names the one step. Several steps are joined
    with commas in :attr:`Decision.action`.

    An alert about another host (its ``host`` label is not ``receiver.host``) is
    ``other_host``, resolved or not, so it never opens nor closes a problem here; in fleet
    mode (``receiver.fleet``) one without a ``host`` label is ``no_host``.
    """
    host = alert.labels.get(HOST_LABEL)
    service = alert.labels.get("service_name", "")
    known = service if service in config.services else ""
    rules = config.receiver.rules
    rule = next((r for r in rules if r.matches(alert.labels)), None) if rules else None
    if rule is not None:
        steps: tuple[str, ...] = rule.steps
    else:
        label = alert.labels.get("remediation", "")
        steps = (label,) if label in REMEDIATION_ACTIONS else ()
    action = ",".join(steps)
    if host != config.receiver.host and (host or config.receiver.fleet):  # "" is no label, as in Prometheus
        return Decision(known, action, _OTHER_HOST if host else _NO_HOST)
    if alert.status == "resolved":
        return Decision(known, action, _RESOLVED)
    if not service:
        return Decision("", action, _NO_SERVICE_NAME)
    if not known:
        return Decision("", action, _UNKNOWN_SERVICE)
    if rule is None and "remediation" not in alert.labels:
        return Decision(known, "", _NO_REMEDIATION)
    if not steps:
        return Decision(known, "", _UNKNOWN_ACTION)
    if any(step not in config.services[known].remediation.allow for step in steps):
        return Decision(known, action, _ACTION_NOT_ALLOWED)
    return Decision(known, action, "")
