"""Queue and task names shared by the API (producer) and the workers (consumers)."""

EDITS_QUEUE = "edits"
DATAGEN_QUEUE = "datagen"

EDIT_TASK = "instructedit.edit"

DATAGEN_CHUNK_TASK = "instructedit.datagen.rows"
DATAGEN_EXPORT_TASK = "instructedit.datagen.export"


def enqueue_edit(app, job_id: str) -> None:
    """Publish the task that runs edit job `job_id` (a Celery app). Only the id travels
    through the broker; the worker reads everything else from the job record. The task id
    is the job id, so every message for a job (first, redelivered, re-sent) names it."""
    app.send_task(EDIT_TASK, args=[job_id], queue=EDITS_QUEUE, task_id=job_id)
