"""The Celery application every service shares: broker, serializer and long-task settings.

Only configuration lives here. The API imports it to enqueue by task *name*, so it never
imports torch or the worker code.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from services.common.queues import (
    DATAGEN_QUEUE,
    EDIT_TASK,
    EDITS_QUEUE,
    FINETUNE_TASK,
    TRAIN_QUEUE,
    WEBHOOK_TASK,
    WEBHOOKS_QUEUE,
)
from services.common.settings import Settings, get_settings


def create_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("instructedit", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Job state lives in our own Redis job records; Celery results would be a second,
        # divergent copy.
        task_ignore_result=True,
        task_queues=[
            Queue(EDITS_QUEUE),
            Queue(DATAGEN_QUEUE),
            Queue(WEBHOOKS_QUEUE),
            Queue(TRAIN_QUEUE),
        ],
        task_default_queue=EDITS_QUEUE,
        task_routes={
            EDIT_TASK: {"queue": EDITS_QUEUE},
            WEBHOOK_TASK: {"queue": WEBHOOKS_QUEUE},
            FINETUNE_TASK: {"queue": TRAIN_QUEUE},
        },
        # A GPU task is acknowledged only after it ran, and goes back to the queue when the
        # worker process dies under it; one job reserved at a time per process.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        worker_proc_alive_timeout=settings.worker_proc_alive_timeout_s,
        # With acks_late over Redis, an unacked task is redelivered after this: it must
        # outlast the longest task or a slow job would run twice.
        broker_transport_options={"visibility_timeout": settings.task_time_limit_s * 2},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
    )
    return app
