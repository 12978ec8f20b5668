"""Queue and task names shared by the API (producer) and the workers (consumers)."""

EDITS_QUEUE = "edits"
DATAGEN_QUEUE = "datagen"
# Webhook deliveries: network I/O with retries, served by a light worker of their own so
# that a slow receiver never holds a GPU worker.
WEBHOOKS_QUEUE = "webhooks"
# Fine-tuning: served by GPU workers started with `--queues train` (or `edits,train`).
TRAIN_QUEUE = "train"

EDIT_TASK = "instructedit.edit"

DATAGEN_CHUNK_TASK = "instructedit.datagen.rows"
DATAGEN_EXPORT_TASK = "instructedit.datagen.export"
# Enqueues a run's chunk tasks, on a worker: the API sends one message whatever the size.
DATAGEN_PLAN_TASK = "instructedit.datagen.plan"

WEBHOOK_TASK = "instructedit.webhooks.deliver"

FINETUNE_TASK = "instructedit.finetune"


def enqueue_edit(app, job_id: str) -> None:
    """Publish the task that runs edit job `job_id` (a Celery app). Only the id travels
    through the broker; the worker reads everything else from the job record. The task id
    is the job id, so every message for a job (first, redelivered, re-sent) names it."""
    app.send_task(EDIT_TASK, args=[job_id], queue=EDITS_QUEUE, task_id=job_id)


def enqueue_webhook(app, job_id: str, event: str, webhook_id: str) -> None:
    """Publish one webhook delivery of job `job_id`'s `event` (a WebhookEvent value).
    `webhook_id` is the delivery's `webhook-id`: the same on every retry of it, so that
    receivers can drop duplicates. The payload is rendered from the record when sent."""
    app.send_task(WEBHOOK_TASK, args=[job_id, event, webhook_id], queue=WEBHOOKS_QUEUE)
