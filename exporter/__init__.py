"""caretaker exporter: observes locally-run services and publishes Prometheus metrics."""
