# callbridge as a container: one instance (several of them share one PostgreSQL: see
# deploy/compose.yaml). Build: docker build -t callbridge .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[postgres]' \
    && rm -rf /build \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/callbridge callbridge

# Not root. Records that cannot be written while the database is away wait in the spool
# here (mount a volume on it so they survive a restart of the container).
USER callbridge
WORKDIR /var/lib/callbridge
ENV CALLBRIDGE_SPOOL_DIR=/var/lib/callbridge
EXPOSE 8080

# Liveness: /healthz answers 200 while the process serves (503 while it drains). A load
# balancer should use /readyz (also 503 when the database lease is not held).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]

# SIGTERM drains: no new calls, live ones get CALLBRIDGE_SHUTDOWN_GRACE_SECONDS (20 by
# default), then end `shutdown`. Give the container longer than that to stop
# (compose: stop_grace_period; docker stop -t).
STOPSIGNAL SIGTERM
CMD ["callbridge", "serve", "--host", "0.0.0.0", "--port", "8080", "--json-logs"]
