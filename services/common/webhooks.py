"""The webhook contract: what a job asks to be told, and the events it can ask for.

A job may name a `webhook_url` and the events to deliver there. Deliveries follow the
Standard Webhooks specification (services/common/webhook_delivery.py signs and sends
them, from the `webhooks` Celery queue, off the GPU worker's path).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

WEBHOOK_URL_MAX_LENGTH = 2048


class WebhookEvent(StrEnum):
    start = "start"  # a worker started the job
    progress = "progress"  # a denoising step finished (at most one delivery a second)
    completed = "completed"  # the job ended: succeeded, failed or canceled


DEFAULT_WEBHOOK_EVENTS = (WebhookEvent.completed,)


class WebhookSpec(BaseModel):
    """Where a job's events go, checked when the job is accepted (and again when sent)."""

    url: str = Field(max_length=WEBHOOK_URL_MAX_LENGTH)
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS))

    def wants(self, event: WebhookEvent) -> bool:
        return event in self.events


def event_type(event: WebhookEvent) -> str:
    """The `type` of the delivered payload: `edit.start`, `edit.progress`, `edit.completed`."""
    return f"edit.{event.value}"
