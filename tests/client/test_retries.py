"""Retries honour Retry-After: a second API app, on real Redis, that takes one submission
a second per key."""

from __future__ import annotations

import time

import pytest
import redis

from instructedit import Client, RateLimitError
from services.common.api_keys import KeyStore
from services.common.settings import Settings
from tests.api.test_upload_limit import serve
from tests.client.conftest import Recorder
from tests.conftest import image_bytes

pytestmark = pytest.mark.e2e


@pytest.fixture
def limited(redis_url, tmp_path):
    """(base URL, key) of an API that refuses a key's second submission in a second."""
    settings = Settings(
        redis_url=redis_url, storage_url=f"file://{tmp_path}/storage", rate_limit="1/second"
    )
    key = KeyStore(redis.Redis.from_url(redis_url)).create("sdk-retries").key
    with serve(settings) as port:
        yield f"http://127.0.0.1:{port}", key


def test_rate_limited_submission_is_retried_after_retry_after(limited):
    base_url, key = limited
    recorder = Recorder()
    with Client(base_url, key, max_retries=3, transport=recorder) as client:
        first = client.edit(image_bytes(), "make it red", num_inference_steps=1)
        started = time.monotonic()
        second = client.edit(image_bytes(), "make it blue", num_inference_steps=1)
        waited = time.monotonic() - started
        listed = [job.id for job in client.list()]
    assert second.id != first.id and second.status == "queued"
    submits = [(req, resp) for req, resp in recorder.exchanges if req.url.path == "/v1/edits"]
    submits = [(req, resp) for req, resp in submits if req.method == "POST"]
    statuses = [resp.status_code for _, resp in submits]
    assert statuses[0] == 202 and 429 in statuses[1:] and statuses[-1] == 202, statuses
    refused = next(resp for _, resp in submits if resp.status_code == 429)
    retry_after = float(refused.headers["retry-after"])
    assert retry_after >= 1
    assert waited >= retry_after
    # Every attempt of one submission carried one Idempotency-Key, and made one job.
    keys = {req.headers["idempotency-key"] for req, _ in submits[1:]}
    assert len(keys) == 1
    assert sorted(listed) == sorted([first.id, second.id])


def test_without_retries_the_429_is_raised_with_retry_after(limited):
    base_url, key = limited
    with Client(base_url, key, max_retries=0) as client:
        client.edit(image_bytes(), "make it red", num_inference_steps=1)
        with pytest.raises(RateLimitError) as raised:
            client.edit(image_bytes(), "make it blue", num_inference_steps=1)
    assert raised.value.status_code == 429 and raised.value.code == "rate_limited"
    assert raised.value.retry_after is not None and raised.value.retry_after >= 1
