"""With S3 storage (moto's S3 server over HTTP) the job's output URLs are presigned GETs
on the public endpoint, which a client downloads without going through the API."""

import io
import uuid

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from services.api.main import create_app
from services.common.settings import Settings
from services.common.storage import open_storage
from services.gpu_worker.edit_job import EditRunner
from services.gpu_worker.engine import EditEngine, EngineOptions
from tests.api.conftest import keyed_client
from tests.conftest import image_bytes
from tests.stack import free_port


@pytest.fixture
def s3_settings(redis_url, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"edits-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    # The public endpoint differs from the internal one only by name, as minio:9000 and
    # localhost:9000 do in compose; both reach the same server here.
    yield Settings(
        redis_url=redis_url,
        storage_url=f"s3://{bucket}/instructedit",
        s3_endpoint_url=endpoint,
        s3_public_endpoint_url=f"http://localhost:{port}",
        resolution=128,
    )
    server.stop()


def test_outputs_are_presigned_urls_that_download(s3_settings, tiny_model_dir):
    with keyed_client(create_app(s3_settings)) as client:
        response = client.post(
            "/v1/edits",
            files={"image": ("a.png", image_bytes((64, 48)), "image/png")},
            data={"prompt": "make it red", "num_inference_steps": "2", "seed": "3"},
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu"))
        engine.setup()
        runner = EditRunner(engine, client.app.state.jobs, open_storage(s3_settings))
        assert runner.handle(job_id) == {job_id: "succeeded"}

        job = client.get(f"/v1/edits/{job_id}").json()
    (output,) = job["outputs"]
    port = s3_settings.s3_endpoint_url.rsplit(":", 1)[1]
    assert output["url"].startswith(f"http://localhost:{port}/")
    assert "X-Amz-Signature" in output["url"]
    download = httpx.get(output["url"])
    assert download.status_code == 200
    assert Image.open(io.BytesIO(download.content)).size == (64, 48)
