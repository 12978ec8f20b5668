"""The request id: taken from X-Request-ID or made, echoed, logged, and kept on the job."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import redis

from services.common.jobs import JobStore
from services.common.logging import JsonFormatter
from tests.conftest import image_bytes


@pytest.fixture
def log_lines():
    """JSON log lines of every logger, as the API process would write them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("api"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def submit(client, headers=None):
    files = {"image": ("shoe.png", image_bytes(), "image/png")}
    return client.post("/v1/edits", files=files, data={"prompt": "red"}, headers=headers)


def stored_job(settings, job_id):
    return JobStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s).get(job_id)


def test_client_request_id_is_echoed_and_kept_on_the_job(client, settings):
    response = submit(client, headers={"X-Request-ID": "checkout-42.a"})
    assert response.status_code == 202
    assert response.headers["x-request-id"] == "checkout-42.a"
    assert stored_job(settings, response.json()["id"]).request_id == "checkout-42.a"


def test_request_id_is_generated_when_absent(client, settings):
    response = submit(client)
    rid = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert stored_job(settings, response.json()["id"]).request_id == rid
    assert client.get("/healthz").headers["x-request-id"] != rid


@pytest.mark.parametrize("bad", ["has space", "x" * 129, 'quote"d', "new\tline"])
def test_unsafe_request_id_is_replaced(client, bad):
    rid = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
    assert rid != bad and re.fullmatch(r"[0-9a-f]{32}", rid)


def test_errors_carry_the_request_id_too(client):
    response = client.get("/v1/edits/nope", headers={"X-Request-ID": "rid-404"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "rid-404"


def test_every_log_line_of_a_request_has_its_id(client, log_lines):
    app = client.app

    @app.get("/_probe")
    def probe() -> dict:  # a sync endpoint: it runs in the thread pool
        logging.getLogger("services.api.probe").info("inside the endpoint")
        return {}

    assert client.get("/_probe", headers={"X-Request-ID": "rid-probe"}).status_code == 200
    entries = [e for e in log_lines() if e.get("request_id") == "rid-probe"]
    inside = [e for e in entries if e["message"] == "inside the endpoint"]
    access = [e for e in entries if e["logger"] == "instructedit.api.access"]
    assert len(inside) == 1
    assert len(access) == 1
    assert access[0]["status"] == 200 and access[0]["route"] == "/_probe"
    assert access[0]["method"] == "GET" and access[0]["duration_ms"] >= 0
