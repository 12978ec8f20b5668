"""/metrics: request counts by route template, latency, submitted jobs and the queue depth,
in one process and summed over several uvicorn worker processes."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.api.main import create_app
from services.common.settings import Settings
from tests.conftest import image_bytes
from tests.stack import BIN, ROOT, free_port, service_env

PNG = image_bytes()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def scrape(client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def submit(client) -> httpx.Response:
    files = {"image": ("shoe.png", PNG, "image/png")}
    return client.post("/v1/edits", files=files, data={"prompt": "make it red"})


def test_requests_are_counted_by_route_template_and_status(client):
    before = scrape(client)
    job_id = submit(client).json()["id"]
    client.get(f"/v1/edits/{job_id}")
    client.get("/v1/edits/does-not-exist")
    client.get(f"/v1/edits/{job_id}/outputs/0")
    client.get("/no/such/path")
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    total = "instructedit_api_requests_total"
    assert delta(total, method="POST", route="/v1/edits", status="202") == 1
    assert delta(total, method="GET", route="/v1/edits/{job_id}", status="200") == 1
    assert delta(total, method="GET", route="/v1/edits/{job_id}", status="404") == 1
    route = "/v1/edits/{job_id}/outputs/{index}"
    assert delta(total, method="GET", route=route, status="409") == 1
    assert delta(total, method="GET", route="<unmatched>", status="404") == 1
    # No series per job id: the path's variables never become labels.
    assert job_id not in after
    latency = "instructedit_api_request_duration_seconds_count"
    assert delta(latency, method="GET", route="/v1/edits/{job_id}") == 2
    assert delta("instructedit_api_jobs_submitted_total") == 1


def test_rejected_submissions_are_not_counted_as_jobs(client):
    before = value(scrape(client), "instructedit_api_jobs_submitted_total")
    files = {"image": ("x.png", b"not an image", "image/png")}
    assert client.post("/v1/edits", files=files, data={"prompt": "x"}).status_code == 422
    assert value(scrape(client), "instructedit_api_jobs_submitted_total") == before


def test_queue_depth_is_read_from_redis_at_scrape_time(client, queue_len):
    assert value(scrape(client), "instructedit_queue_depth", queue="edits") == 0
    for _ in range(3):
        submit(client)
    text = scrape(client)
    assert queue_len() == 3
    assert value(text, "instructedit_queue_depth", queue="edits") == 3
    assert value(text, "instructedit_api_redis_up") == 1


def test_metrics_answer_without_redis(tmp_path):
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", storage_url=f"file://{tmp_path}"
    )
    with TestClient(create_app(settings)) as client:
        text = scrape(client)
    assert value(text, "instructedit_api_redis_up") == 0
    assert "instructedit_queue_depth{" not in text


@pytest.mark.timeout(120)
def test_several_uvicorn_workers_report_their_sum(redis_url, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR: whichever process answers /metrics counts every request."""
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    env = service_env(
        redis_url=redis_url, storage_url=f"file://{tmp_path}/storage", auth="disabled"
    )
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    port = free_port()
    argv = [str(BIN / "uvicorn"), "services.api.main:app", "--port", str(port)]
    argv += ["--host", "127.0.0.1", "--workers", "2"]
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(list(metrics_dir.glob("*.db"))) < 2 or not _answers(port):
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "api.log"
            ).read_text()
            time.sleep(0.2)
        sent = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            # New connections until both processes answered some (their access logs say).
            while sent < 200 and len(_processes_that_logged_404(tmp_path / "api.log")) < 2:
                for _ in range(10):
                    http.get("/v1/edits/nope", headers={"Connection": "close"})
                sent += 10
                time.sleep(0.1)
            for _ in range(2):
                submit(http)
        assert len(_processes_that_logged_404(tmp_path / "api.log")) == 2
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert value(text, "instructedit_api_jobs_submitted_total") == 2
        assert value(text, "instructedit_queue_depth", queue="edits") == 2
        not_found = {"method": "GET", "route": "/v1/edits/{job_id}", "status": "404"}
        assert value(text, "instructedit_api_requests_total", **not_found) == sent
        assert len({p.name for p in metrics_dir.glob("counter_*.db")}) == 2
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _processes_that_logged_404(log_path) -> set[int]:
    return {
        entry["process"]
        for line in log_path.read_text().splitlines()
        if line.startswith("{") and (entry := json.loads(line)).get("status") == 404
    }


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
