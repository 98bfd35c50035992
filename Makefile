# caretaker: two commands do all the set-up on a fresh Debian/Ubuntu machine.
#   make run    the local stack (Redis + demo web app, watched and healed), Ctrl+C stops it
#   make test   the whole test suite, against the real Prometheus, Alertmanager, Redis
# Also: make demo (break things in a running stack), make lint, make check-config,
#       make docs (docs/configuration.md and docs/caretaker.schema.json, from the config models),
#       make bench (scrape, logs, webhook, fuzz, claims), make bench-heal (heal time vs supervisord and monit).

VENV ?= .venv
PY := $(VENV)/bin/python
STACK_PACKAGES := venv:python3-venv prometheus:prometheus prometheus-alertmanager:prometheus-alertmanager \
	redis-server:redis-server
TEST_PACKAGES := $(STACK_PACKAGES) promtool:prometheus amtool:prometheus-alertmanager logrotate:logrotate \
	postgres:postgresql openssl:openssl supervisord:supervisor supervisorctl:supervisor \
	prometheus-process-exporter:prometheus-process-exporter systemd-analyze:systemd

.PHONY: run demo test lint docs bench bench-heal check-config packages-stack packages-test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

packages-stack:
	@scripts/ensure-packages.sh $(STACK_PACKAGES)

packages-test:
	@scripts/ensure-packages.sh $(TEST_PACKAGES)

run: packages-stack $(VENV)/.installed
	$(PY) -m demo.stack $(STACK_ARGS)

demo: $(VENV)/.installed
	$(PY) -m demo.incidents

test: packages-test $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check exporter receiver caretaker_client demo tests bench grafana
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench/*.py demo/*.py grafana/*.py

docs: $(VENV)/.installed
	$(PY) -m exporter.config.docs

bench: $(VENV)/.installed
	@scripts/ensure-packages.sh wrk:wrk prometheus-process-exporter:prometheus-process-exporter redis-server:redis-server
	$(PY) bench/scrape.py
	$(PY) bench/logs.py
	$(PY) bench/webhook.py
	$(PY) bench/fuzz.py
	$(PY) bench/claims.py

bench-heal: $(VENV)/.installed
	@scripts/ensure-packages.sh $(STACK_PACKAGES) monit:monit supervisord:supervisor
	$(PY) bench/heal.py $(HEAL_ARGS)

check-config: $(VENV)/.installed
	$(VENV)/bin/caretaker-exporter --check-config --config caretaker.yml
	promtool check config prometheus/prometheus.yml
	amtool check-config prometheus/alertmanager.yml

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache *.egg-info
