"""The receiver's own metrics (``caretaker_remediation...``, ``caretaker_alerts...``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from exporter.config import Config

from .vocabulary import Reason, RepairResult

__all__ = ["ReceiverMetrics"]


class ReceiverMetrics:
    """The receiver's own metrics, on the app's registry; label sets pre-initialised.

    The three counters bumped on every webhook request (alerts received, alerts
    skipped, requests by code) are plain ints exposed by :meth:`collect` at scrape
    time: prometheus_client's ``Counter.inc`` takes a lock and checks its state on each
    call, about 3 us, a tenth of a notification's CPU time. Only the event loop's
    thread touches them, scrapes included.

    ``caretaker_alerts_skipped_total{service_name, reason}`` has every configured
    service with every :class:`~receiver.vocabulary.Reason` from the first scrape on,
    and ``service_name=""`` for alerts about no known service.
    """

    def __init__(self, registry: CollectorRegistry, config: Config) -> None:
        self.received = {"firing": 0, "resolved": 0}
        self.skipped = {(name, reason.value): 0 for name in config.services for reason in Reason}
        self.requests: dict[int, int] = {}
        registry.register(self)
        self.remediations = Counter("caretaker_remediations", "Repairs run, by result.",
                                    ["action", "service_name", "result"], registry=registry)
        self.duration = Histogram("caretaker_remediation_duration_seconds",
                                  "Time from the start of a repair to its verified end.", ["action"],
                                  buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=registry)
        self.in_progress = Gauge("caretaker_remediations_in_progress", "Repairs running now.", registry=registry)
        self.exhausted = Gauge("caretaker_remediation_attempts_exhausted",
                               "1 while the service's attempt budget is spent and repairs back off.",
                               ["service_name"], registry=registry)
        self.paused = Gauge("caretaker_service_paused", "1 while an operator has paused the service's repairs.",
                            ["service_name"], registry=registry)
        self.problems = Gauge("caretaker_problems_open", "Open problems of the service (firing repair alerts).",
                              ["service_name"], registry=registry)
        self.next_attempt = Gauge("caretaker_repair_next_attempt_timestamp_seconds",
                                  "When the next repair attempt of the service may start (0: at once).",
                                  ["service_name"], registry=registry)
        for name, svc in config.services.items():
            self.exhausted.labels(name)
            self.paused.labels(name)
            self.problems.labels(name)
            self.next_attempt.labels(name)
            for action in svc.remediation.allow:
                self.duration.labels(action)
                for result in RepairResult:
                    self.remediations.labels(action, name, result)

    def skip(self, service: str, reason: str) -> None:
        """Count an alert not acted on (``service`` "" when unknown: bounded cardinality;
        ``reason`` a :class:`~receiver.vocabulary.Reason`)."""
        key = (service, reason)
        self.skipped[key] = self.skipped.get(key, 0) + 1

    def request_count(self, code: int) -> None:
        """Count one webhook answer."""
        self.requests[code] = self.requests.get(code, 0) + 1

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily("caretaker_alerts_received", "Alerts received in webhook notifications.",
                                       labels=["status"])
        for status, n in self.received.items():
            received.add_metric([status], n)
        skipped = CounterMetricFamily("caretaker_alerts_skipped",
                                      "Alerts not acted on, by reason (service_name empty when unknown).",
                                      labels=["service_name", "reason"])
        for (service, reason), n in self.skipped.items():
            skipped.add_metric([service, reason], n)
        requests = CounterMetricFamily("caretaker_webhook_requests", "Webhook requests, by HTTP status code.",
                                       labels=["code"])
        for code, n in sorted(self.requests.items()):
            requests.add_metric([str(code)], n)
        yield from (received, skipped, requests)
