"""When Redis, storage or the broker fails, the client gets a JSON 503 naming what failed, and
a submission leaves nothing half-done: no input without a job, no job that waits forever."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from botocore.exceptions import EndpointConnectionError
from fastapi.testclient import TestClient
from kombu.exceptions import OperationalError

from services.api.deps import get_celery, get_job_store, get_storage
from services.api.main import create_app
from services.common.edit_params import EditParams
from services.common.jobs import EditJob, JobStatus, JobStore
from services.common.storage import StorageError
from tests.api.conftest import keyed_client
from tests.api.test_edits import submit
from tests.stack import free_port

DEAD_REDIS = "redis://127.0.0.1:{port}/0"


def assert_503(response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]


@pytest.fixture
def redis_down(settings):
    broken = settings.model_copy(update={"redis_url": DEAD_REDIS.format(port=free_port())})
    with TestClient(create_app(broken)) as client:
        # Shaped like a key: checking it is what needs Redis first.
        client.headers["Authorization"] = "Bearer ie_0123456789ab_secret"
        yield client


def test_reads_and_cancels_without_redis_are_json_503(redis_down):
    assert_503(redis_down.get("/v1/edits/abc"), "job_store_unavailable")
    assert_503(redis_down.get("/v1/edits/abc/outputs/0"), "job_store_unavailable")
    assert_503(redis_down.post("/v1/edits/abc/cancel"), "job_store_unavailable")
    assert_503(redis_down.get("/v1/datasets/abc"), "job_store_unavailable")


def test_submit_without_redis_is_503_and_keeps_no_input(redis_down, stored):
    assert_503(submit(redis_down), "job_store_unavailable")
    assert stored() == []


class StorageDown:
    """A store whose every call fails as an unreachable S3 endpoint does."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise StorageError(f"{name}: could not connect to the endpoint")

        return fail


def test_submit_with_storage_down_is_503_and_records_nothing(client, queue_len, job_keys):
    client.app.dependency_overrides[get_storage] = StorageDown
    assert_503(submit(client), "storage_unavailable")
    assert job_keys() == []
    assert queue_len() == 0


class BrokerDown:
    """A Celery app whose broker refuses the message; `before` runs first, as a worker
    would meanwhile."""

    def __init__(self, before=None) -> None:
        self.before = before

    def send_task(self, name, args, **kwargs):
        if self.before:
            self.before(args[0])
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def only_job(client) -> EditJob:
    store = client.app.state.jobs
    (key,) = store.redis.keys("instructedit:job:*")
    return store.get(key.decode().rsplit(":", 1)[1])


def test_unpublished_job_is_failed_and_leaves_the_pending_index(client, queue_len, stored):
    client.app.dependency_overrides[get_celery] = BrokerDown
    assert_503(submit(client), "queue_unavailable")
    job = only_job(client)
    assert job.status == JobStatus.failed
    assert job.error.code == "enqueue_failed"
    # No worker gathering a batch may pick it up: the client was told it was not accepted.
    assert client.app.state.jobs.pending(job.batch_key, 10) == []
    assert queue_len() == 0


class PendingIndexDown(JobStore):
    def add_pending(self, job: EditJob) -> None:
        raise redis.ConnectionError("Connection reset by peer")


def test_job_that_could_not_be_indexed_is_failed(client, settings, queue_len):
    jobs = PendingIndexDown(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)
    client.app.dependency_overrides[get_job_store] = lambda: jobs
    assert_503(submit(client), "queue_unavailable")
    job = only_job(client)
    assert job.status == JobStatus.failed
    assert jobs.pending(job.batch_key, 10) == []
    assert queue_len() == 0


def test_job_a_worker_took_although_publishing_failed_is_accepted(client):
    store = client.app.state.jobs

    def worker_claims(job_id: str) -> None:
        # A worker gathering a batch from the pending index claims it before send fails.
        store.claim(job_id, timedelta(seconds=60), queued_only=True)

    client.app.dependency_overrides[get_celery] = lambda: BrokerDown(before=worker_claims)
    response = submit(client)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "running"
    assert response.headers["location"] == f"/v1/edits/{job['id']}"
    assert store.get(job["id"]).status == JobStatus.running


def succeeded_job(jobs: JobStore, owner: str) -> str:
    job = EditJob.new(EditParams(prompt="make it red"), "image/png", None, (64, 48), owner=owner)
    jobs.create(job)
    key = f"edits/{job.id}/a/output_0.png"
    jobs.succeed(jobs.claim(job.id, timedelta(seconds=60)).job, [key])
    return job.id


def test_succeeded_job_with_storage_down_is_503(client):
    job_id = succeeded_job(client.app.state.jobs, client.key_id)
    client.app.dependency_overrides[get_storage] = StorageDown
    assert_503(client.get(f"/v1/edits/{job_id}"), "storage_unavailable")
    assert_503(client.get(f"/v1/edits/{job_id}/outputs/0"), "storage_unavailable")


class EndpointDown:
    """Raises what botocore raises when the S3 endpoint does not answer."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise EndpointConnectionError(endpoint_url="http://minio:9000/edits")

        return fail


def test_botocore_errors_are_503_too(client):
    job_id = succeeded_job(client.app.state.jobs, client.key_id)
    client.app.dependency_overrides[get_storage] = EndpointDown
    assert_503(client.get(f"/v1/edits/{job_id}"), "storage_unavailable")
    assert_503(client.get(f"/v1/edits/{job_id}/outputs/0"), "storage_unavailable")


def test_s3_output_urls_that_cannot_be_presigned_are_503(settings, monkeypatch, tmp_path):
    # Real S3 storage with no credentials to sign with: presigning and reading both fail
    # before any request leaves the process.
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3 = settings.model_copy(
        update={
            "storage_url": "s3://edits/instructedit",
            "s3_endpoint_url": f"http://127.0.0.1:{free_port()}",
        }
    )
    with keyed_client(create_app(s3)) as client:
        job_id = succeeded_job(client.app.state.jobs, client.key_id)
        assert_503(client.get(f"/v1/edits/{job_id}"), "storage_unavailable")
        assert_503(client.get(f"/v1/edits/{job_id}/outputs/0"), "storage_unavailable")


class Broken:
    def get(self, job_id):
        raise RuntimeError("a bug")


def test_unexpected_errors_are_json_500_too(client):
    client.app.dependency_overrides[get_job_store] = Broken
    with TestClient(client.app, raise_server_exceptions=False) as plain:
        plain.headers.update(client.headers)
        response = plain.get("/v1/edits/abc")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "a bug" not in response.text  # internals stay in the server log
