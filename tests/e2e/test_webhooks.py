"""Webhooks on the running stack: a job submitted over HTTP with a webhook URL is
delivered, signed with its key's secret (verified with the `standardwebhooks` package),
by the webhooks worker; URLs of private addresses are refused at submission."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import image_bytes
from tests.e2e.conftest import start_stack
from tests.stack import service_env, start_webhooks_worker
from tests.webhooks import Receiver

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hooked_stack(claim_redis_db, tiny_model_dir, tmp_path_factory):
    # The receiver runs on this machine: 127.0.0.1 is allowed by name, as an operator
    # allows a receiver inside the deployment.
    stack = start_stack(
        tmp_path_factory, tiny_model_dir, claim_redis_db(), webhook_allowed_hosts="127.0.0.1"
    )
    hooks = start_webhooks_worker(service_env(**stack.settings), tmp_path_factory.mktemp("wh"))
    yield stack
    hooks.stop()
    stack.api.stop()
    stack.worker.stop()


def submit(stack, client, webhook_url: str, events: str = "completed"):
    return client.post(
        "/v1/edits",
        files={"image": ("p.png", image_bytes((64, 48)), "image/png")},
        data={
            "prompt": "make it red",
            "num_inference_steps": "4",
            "webhook_url": webhook_url,
            "webhook_events": events,
        },
    )


def test_a_job_delivers_signed_start_and_completed_events(hooked_stack):
    stack = hooked_stack
    with Receiver() as receiver, stack.client() as client:
        response = submit(stack, client, receiver.url(), "start,progress,completed")
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["webhook"]["events"] == ["start", "progress", "completed"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            types = [json.loads(r.body)["type"] for r in receiver.received]
            if "edit.completed" in types:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no completed delivery: {types}")
        # Sent concurrently, like every webhook system's: arrival order is not promised.
        assert types.count("edit.start") == 1 and types.count("edit.completed") == 1
        secret = stack.key.webhook_secret
        for request in receiver.received:
            headers = {k.lower(): v for k, v in request.headers.items()}
            payload = Webhook(secret).verify(request.body, headers)  # raises if forged
            assert payload["data"]["id"] == job["id"]
        bodies = [json.loads(r.body) for r in receiver.received]
        completed = next(b["data"] for b in bodies if b["type"] == "edit.completed")
        assert completed["status"] == "succeeded"
        # Its output URLs work for whoever the receiver hands them to, without a key.
        download = httpx.get(completed["outputs"][0]["url"])
        assert download.status_code == 200 and download.content.startswith(b"\x89PNG")

        # The attempts are in the job's record.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            record = client.get(f"/v1/edits/{job['id']}").json()
            delivered = [d for d in record["webhook"]["deliveries"] if d["event"] == "completed"]
            if delivered:
                break
            time.sleep(0.1)
        assert delivered[0]["status_code"] == 204 and delivered[0]["final"]
        # One delivery id per event: the receiver can drop a duplicate by it.
        ids = [r.headers["webhook-id"] for r in receiver.received]
        assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://10.0.0.5/hook",  # private
        "http://localhost:9/hook",  # loopback by name, not allow-listed
        "ftp://example.com/hook",  # not http(s)
    ],
)
def test_webhooks_to_private_addresses_are_refused_at_submission(hooked_stack, url):
    with hooked_stack.client() as client:
        response = submit(hooked_stack, client, url)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_webhook_url"
