"""The FastAPI gateway: `uvicorn services.api.main:app`."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio
from celery import Celery
from fastapi import FastAPI

from services.api import metrics
from services.api.docs import install_docs
from services.api.errors import install_error_handlers
from services.api.idempotency import IdempotencyStore
from services.api.limits import SubmissionLimits
from services.api.middleware import RequestContextMiddleware
from services.api.routes import datasets, edits, finetunes, health, ui
from services.api.signed_urls import LazySigner
from services.api.uploads import UploadLimitMiddleware
from services.common.api_keys import KeyStore
from services.common.celery_app import create_celery_app
from services.common.datasets import RunStore
from services.common.jobs import JobStore
from services.common.logging import configure_logging
from services.common.queues import EDITS_QUEUE
from services.common.settings import Settings, get_settings
from services.common.storage import open_storage
from services.common.webhook_notify import WebhookNotifier

log = logging.getLogger(__name__)


def warm_broker_connections(celery: Celery, client: redis.Redis) -> None:
    """Open every connection of the Celery producer pool before requests need them.

    A new producer connection costs ~20 ms (connect, channel, queue declaration); opened
    lazily, the first burst of submissions pays them all at once and queues up behind them.
    """
    try:
        client.ping()  # a broker that is down is the readiness probe's business
    except redis.RedisError:
        return
    producers = []
    queue = celery.amqp.queues[EDITS_QUEUE]
    try:
        for _ in range(celery.conf.broker_pool_limit or 1):
            producers.append(celery.producer_pool.acquire(block=True, timeout=5))
            producers[-1].maybe_declare(queue)
    except Exception as exc:
        log.warning("opening broker connections ahead of requests failed: %s", exc)
    finally:
        for producer in producers:
            producer.release()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    if app.state.warm_broker:
        threading.Thread(
            target=warm_broker_connections,
            args=(app.state.celery, app.state.redis),
            name="warm-broker",
            daemon=True,
        ).start()
    try:
        yield
    finally:
        await app.state.async_redis.aclose()


def create_app(settings: Settings | None = None, *, warm_broker: bool = False) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="InstructEdit",
        version="0.1.0",
        description="Edit product photos by text instruction (InstructPix2Pix).",
        lifespan=_lifespan,
        # /docs is served below from Swagger UI's own files, so that it works offline;
        # FastAPI's would load them from a CDN. (ReDoc has no packaged assets: off.)
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.warm_broker = warm_broker
    app.state.redis = redis.Redis.from_url(settings.redis_url)
    # Job event streams and `?wait=` block on Redis without holding a thread.
    app.state.async_redis = redis.asyncio.Redis.from_url(settings.redis_url)
    app.state.jobs = JobStore(
        app.state.redis,
        settings.job_ttl_s,
        redeliver_after_s=settings.job_redeliver_after_s,
        max_unfinished=settings.max_queue_depth,
        max_unfinished_per_owner=settings.max_unfinished_jobs_per_key,
    )
    app.state.runs = RunStore(app.state.redis, settings.job_ttl_s)
    app.state.storage = open_storage(settings)
    app.state.keys = KeyStore(app.state.redis)
    app.state.limits = SubmissionLimits(settings)
    app.state.idempotency = IdempotencyStore(app.state.redis, settings.idempotency_ttl_s)
    # The signing secret is read from Redis once it is needed (Redis may be down now).
    app.state.url_signer = LazySigner(app.state.redis, settings)
    app.state.celery = create_celery_app(settings)
    app.state.notify = WebhookNotifier(app.state.celery)
    install_error_handlers(app)
    # Added first, so it runs inside the request context: its 413s carry the request id
    # and are counted and logged like every other response.
    app.add_middleware(UploadLimitMiddleware, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware)
    install_docs(app)
    app.include_router(health.router)
    app.include_router(edits.router)
    app.include_router(datasets.router)
    app.include_router(finetunes.router)
    app.include_router(metrics.router)
    app.include_router(ui.router)
    return app


_settings = get_settings()
configure_logging("api", _settings.log_level, as_json=_settings.log_json)
app = create_app(_settings, warm_broker=True)
