"""An edit job as clients see it: GET /v1/edits/{id}, its event stream's final event, the
listing, and the `data` of webhook deliveries all render it here."""

from __future__ import annotations

import functools

import redis

from services.api.schemas import EditJobResponse, WebhookDelivery
from services.api.signed_urls import UrlSigner
from services.common.jobs import EditJob, JobStore
from services.common.settings import Settings, get_settings
from services.common.storage import Storage, open_storage


def output_path(job_id: str, index: int) -> str:
    return f"/v1/edits/{job_id}/outputs/{index}"


class JobView:
    def __init__(
        self, settings: Settings, jobs: JobStore, storage: Storage, signer: UrlSigner
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.storage = storage
        self.signer = signer

    def output_urls(self, job: EditJob) -> list[str]:
        """Short-lived URLs, made anew for each response: presigned by S3, or signed by
        the API for file storage, from the configured public base URL (never from the
        request's Host header)."""
        expiry = self.settings.presigned_url_expiry_s
        urls = []
        for index, key in enumerate(job.output_keys):
            url = self.storage.presigned_url(key, expiry)
            if url is None:
                base = self.settings.public_base_url.rstrip("/")
                url = base + self.signer.sign(output_path(job.id, index), expiry)
            urls.append(url)
        return urls

    def deliveries(self, job: EditJob) -> list[WebhookDelivery]:
        if job.webhook is None:
            return []
        raws = self.jobs.redis.lrange(self.jobs.deliveries_key(job.id), 0, -1)
        return [WebhookDelivery.model_validate_json(raw) for raw in raws]

    def render(self, job: EditJob, with_queue: bool = True) -> EditJobResponse:
        # A queued job says where it stands in the queue (reads only, never for others).
        position, wait_s = self.jobs.queue_position(job) if with_queue else (None, None)
        return EditJobResponse.from_job(
            job, self.output_urls(job), position, wait_s, self.deliveries(job)
        )


@functools.cache
def _webhook_view() -> JobView:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url)
    jobs = JobStore(client, settings.job_ttl_s)
    signer = UrlSigner.shared(client, settings.url_signing_secret)
    return JobView(settings, jobs, open_storage(settings), signer)


def render_job_for_webhook(job: EditJob) -> dict:
    """The job as GET /v1/edits/{id} returns it, JSON-able: a webhook delivery's `data`."""
    return _webhook_view().render(job, with_queue=False).model_dump(mode="json")
