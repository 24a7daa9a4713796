# Sluice: one image for every process (worker, slack, discord, web); the command picks the role.
# Pinned base: a fixed Python patch release on a fixed Debian release.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The openai SDK's HTTP stack verifies TLS against the system store: keep it present and current.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /app --shell /usr/sbin/nologin sluice

WORKDIR /app
# Reproducible: every dependency at the version and hashes of requirements.lock (made by
# pip-compile --generate-hashes from pyproject.toml; docs/deploy.md), then Sluice itself
# without resolving anything again.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY core ./core
COPY workers ./workers
COPY bots ./bots
COPY sluice ./sluice
RUN pip install --no-cache-dir --no-deps . \
    && chown sluice:sluice /app

USER 10001:10001

# Workers serve /metrics and /healthz on 9100 on all interfaces of the container; the
# host decides what is published (adapters answer on their own port and set
# SLUICE_HEALTH_URL to it). The web chat is not bound to all interfaces here: it stays
# on loopback unless its command says `--host 0.0.0.0`, which it refuses without
# SLUICE_WEB_AUTH or SLUICE_WEB_TOKEN, and SLUICE_WEB_SECRET (docs/deploy.md).
ENV SLUICE_METRICS_HOST=0.0.0.0 \
    SLUICE_METRICS_PORT=9100 \
    SLUICE_HEALTH_URL=http://127.0.0.1:9100/healthz
EXPOSE 8080 3000 9100

# Every long-running process answers GET /healthz; SLUICE_HEALTH_URL says where (per service).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SLUICE_HEALTH_URL'], timeout=2)"]

CMD ["sluice", "worker"]
