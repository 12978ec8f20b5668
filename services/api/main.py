"""The FastAPI gateway: `uvicorn services.api.main:app`."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI

from services.api.errors import install_error_handlers
from services.api.routes import edits, health
from services.common.celery_app import create_celery_app
from services.common.jobs import JobStore
from services.common.settings import Settings, get_settings
from services.common.storage import open_storage


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="InstructEdit",
        version="0.1.0",
        description="Edit product photos by text instruction (InstructPix2Pix).",
    )
    app.state.settings = settings
    app.state.redis = redis.Redis.from_url(settings.redis_url)
    app.state.jobs = JobStore(app.state.redis, settings.job_ttl_s)
    app.state.storage = open_storage(settings)
    app.state.celery = create_celery_app(settings)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(edits.router)
    return app


logging.basicConfig(level=logging.INFO)
app = create_app()
