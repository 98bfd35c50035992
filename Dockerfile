# caretaker's two programs in one image. It runs as an unprivileged user; see
# docker-compose.yml for what a container can and cannot see and repair on the host.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/caretaker --create-home caretaker
WORKDIR /opt/caretaker
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY receiver ./receiver
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER caretaker
EXPOSE 8930 8931
ENV CARETAKER_HEALTH_URL=http://127.0.0.1:8930/-/healthy
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['CARETAKER_HEALTH_URL'], timeout=4)"]
CMD ["caretaker-exporter", "--config", "/etc/caretaker/caretaker.yml"]
