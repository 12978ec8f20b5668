# syntax=docker/dockerfile:1.7
#
# InstructEdit REST gateway (FastAPI + uvicorn). No torch, no model: it only
# talks to Redis (Celery broker/backend) and S3 (MinIO).
#
#   docker build -f docker/api.Dockerfile -t instructedit/api:dev .
#
# Dependencies: requirements/api.txt, the lock of pyproject's `api` extra (`make lock`),
# installed hash-checked and with --no-deps, so nothing outside the lock is resolved.
#
# Runtime configuration is environment only (INSTRUCTEDIT_*, AWS_*): nothing
# secret is baked into the image. See docs/DEPLOYMENT.md.

############################################################################
# builder: a virtual environment with the project and its API dependencies
############################################################################
FROM python:3.11.14-slim-bookworm AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, from the lock alone, so that code changes do not reinstall
# them (layer cache).
COPY requirements/api.txt requirements/
RUN pip install --require-hashes --no-deps -r requirements/api.txt

# Then the project itself, built with the locked setuptools, without touching the
# dependencies. pip check proves the lock holds every dependency; the import check
# that the gateway needs nothing beyond the API extra (no torch).
COPY pyproject.toml README.md* ./
COPY services ./services
RUN test -f README.md || : > README.md; \
    pip install --no-deps --no-build-isolation /src \
    && pip check \
    && INSTRUCTEDIT_STORAGE_URL=file:///tmp/import-check python -c "import services.api.main"

############################################################################
# runtime
############################################################################
FROM python:3.11.14-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="instructedit-api" \
      org.opencontainers.image.description="InstructEdit REST gateway (FastAPI)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/app

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
       --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv

WORKDIR /home/app
USER 10001:10001

EXPOSE 8000

# Liveness only (/healthz); compose's healthcheck uses /readyz (Redis + S3).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

CMD ["uvicorn", "services.api.main:app", "--host", "0.0.0.0", "--port", "8000"]
