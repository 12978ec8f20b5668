"""Response models of the public API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from services.common.edit_params import (
    EditForm,  # noqa: F401  (the form, re-exported)
    EditParams,
)
from services.common.jobs import EditJob, JobError, JobStatus, Progress
from services.common.webhooks import WebhookEvent
from services.common.workers import EngineStatus


class OutputRef(BaseModel):
    index: int
    url: str


class WebhookDelivery(BaseModel):
    """One attempt to deliver one of the job's webhook events."""

    webhook_id: str
    event: WebhookEvent
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None
    final: bool = False


class WebhookInfo(BaseModel):
    url: str
    events: list[WebhookEvent]
    deliveries: list[WebhookDelivery] = Field(
        [], description="Delivery attempts so far, oldest first (the latest 50)"
    )


class EditJobResponse(BaseModel):
    id: str
    status: JobStatus
    params: EditParams
    # Whether a mask came with the job (the mask itself is not served back).
    mask: bool = False
    webhook: WebhookInfo | None = None
    progress: Progress
    outputs: list[OutputRef]
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = Field(
        None,
        description="While the job is queued: its place among the queued jobs, by the time "
        "they were submitted (1: the next to start). Null once it runs or ended.",
    )
    estimated_wait_s: float | None = Field(
        None,
        description="While the job is queued: roughly how many seconds until it starts, "
        "from its queue position and how often recent jobs finished (several workers and "
        "batched jobs make that more often than one job takes). Null once it runs or "
        "ended, and while no job finished recently.",
    )

    @classmethod
    def from_job(
        cls,
        job: EditJob,
        output_urls: list[str],
        queue_position: int | None = None,
        estimated_wait_s: float | None = None,
        deliveries: list[WebhookDelivery] | None = None,
    ) -> EditJobResponse:
        webhook = None
        if job.webhook is not None:
            webhook = WebhookInfo(
                url=job.webhook.url, events=job.webhook.events, deliveries=deliveries or []
            )
        return cls(
            id=job.id,
            status=job.status,
            params=job.params,
            mask=job.mask_key is not None,
            webhook=webhook,
            progress=job.progress,
            outputs=[OutputRef(index=i, url=url) for i, url in enumerate(output_urls)],
            error=job.error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            queue_position=queue_position,
            estimated_wait_s=estimated_wait_s,
        )


class ReadinessResponse(BaseModel):
    ready: bool
    redis: str
    storage: str
    # Workers that answered a broker ping, and the engines among them ready to serve.
    workers: list[str]
    engines: list[EngineStatus] = []


class EditJobList(BaseModel):
    data: list[EditJobResponse]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page"
    )
