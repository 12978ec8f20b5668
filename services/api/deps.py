"""Request dependencies: settings, Redis, job store, storage and the Celery producer."""

from __future__ import annotations

from typing import Annotated

import redis
import redis.asyncio
from celery import Celery
from fastapi import Depends, Request

from services.api.idempotency import IdempotencyStore
from services.api.job_view import JobView
from services.api.limits import SubmissionLimits
from services.common.datasets import RunStore
from services.common.jobs import JobStore
from services.common.settings import Settings
from services.common.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def get_async_redis(request: Request) -> redis.asyncio.Redis:
    """For what waits on Redis without holding a thread: job event streams."""
    return request.app.state.async_redis


def get_job_store(request: Request) -> JobStore:
    return request.app.state.jobs


def get_run_store(request: Request) -> RunStore:
    return request.app.state.runs


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_job_view(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    jobs: Annotated[JobStore, Depends(get_job_store)],
    storage: Annotated[Storage, Depends(get_storage)],
) -> JobView:
    return JobView(settings, jobs, storage, request.app.state.url_signer)


def get_limits(request: Request) -> SubmissionLimits:
    return request.app.state.limits


def get_idempotency(request: Request) -> IdempotencyStore:
    return request.app.state.idempotency


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[redis.asyncio.Redis, Depends(get_async_redis)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
RunStoreDep = Annotated[RunStore, Depends(get_run_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
JobViewDep = Annotated[JobView, Depends(get_job_view)]
LimitsDep = Annotated[SubmissionLimits, Depends(get_limits)]
IdempotencyDep = Annotated[IdempotencyStore, Depends(get_idempotency)]
