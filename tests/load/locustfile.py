"""Load test of a running stack: submit, poll until finished, download the output.

    make loadtest                      # against `make run MODEL=tiny` on 127.0.0.1:8000
    locust -f tests/load/locustfile.py --host http://127.0.0.1:8000

Besides the HTTP requests, every job reports custom "JOB" entries in Locust's statistics:
`end_to_end` (from the submit request to the downloaded output, as the client sees it),
and from the job record `queue_wait` (created -> started) and `worker` (started ->
finished). A job that fails, is canceled or does not finish in time counts as a failure of
`end_to_end`.

Knobs (environment): LOADTEST_STEPS (denoising steps, default 4), LOADTEST_IMAGE_SIDE
(pixels of the square test photo, default 128), LOADTEST_POLL_S (default 0.1),
LOADTEST_JOB_TIMEOUT_S (default 300), LOADTEST_WAIT_S (pause between a user's jobs,
default 0).
"""

from __future__ import annotations

import io
import os
import random
import time
from datetime import datetime

from locust import HttpUser, constant, task
from PIL import Image

STEPS = int(os.environ.get("LOADTEST_STEPS", "4"))
IMAGE_SIDE = int(os.environ.get("LOADTEST_IMAGE_SIDE", "128"))
POLL_S = float(os.environ.get("LOADTEST_POLL_S", "0.1"))
JOB_TIMEOUT_S = float(os.environ.get("LOADTEST_JOB_TIMEOUT_S", "300"))
WAIT_S = float(os.environ.get("LOADTEST_WAIT_S", "0"))
FINISHED = {"succeeded", "failed", "canceled"}
PROMPTS = [
    "print a spiderman logo on it",
    "make it red",
    "turn it into leather",
    "add white stripes",
    "make it look vintage",
]


def product_photo(side: int = IMAGE_SIDE) -> bytes:
    """A JPEG with some structure (a gradient and a square), like a small product shot."""
    image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    image.paste((30, 30, 30), (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


PHOTO = product_photo()


def _seconds(job: dict, start: str, end: str) -> float | None:
    if not job.get(start) or not job.get(end):
        return None
    delta = datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])
    return delta.total_seconds()


class EditUser(HttpUser):
    wait_time = constant(WAIT_S)

    def _report(self, name: str, start: float, *, length: int = 0, exc=None, ms=None) -> None:
        self.environment.events.request.fire(
            request_type="JOB",
            name=name,
            response_time=ms if ms is not None else (time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )

    @task
    def edit(self) -> None:
        start = time.perf_counter()
        with self.client.post(
            "/v1/edits",
            files={"image": ("product.jpg", PHOTO, "image/jpeg")},
            data={
                "prompt": random.choice(PROMPTS),
                "num_inference_steps": str(STEPS),
                "seed": str(random.randrange(2**32)),
            },
            name="/v1/edits [submit]",
            catch_response=True,
        ) as response:
            if response.status_code != 202:
                response.failure(f"submit answered {response.status_code}: {response.text[:200]}")
                self._report("end_to_end", start, exc=RuntimeError("submit refused"))
                return
            job = response.json()

        deadline = start + JOB_TIMEOUT_S
        while job["status"] not in FINISHED:
            if time.perf_counter() > deadline:
                self._report("end_to_end", start, exc=TimeoutError(f"job {job['id']} unfinished"))
                return
            time.sleep(POLL_S)
            response = self.client.get(f"/v1/edits/{job['id']}", name="/v1/edits/[id]")
            if response.status_code != 200:
                self._report("end_to_end", start, exc=RuntimeError("poll failed"))
                return
            job = response.json()

        if job["status"] != "succeeded":
            error = (job.get("error") or {}).get("code", job["status"])
            self._report("end_to_end", start, exc=RuntimeError(f"job {job['status']}: {error}"))
            return
        response = self.client.get(job["outputs"][0]["url"], name="/v1/edits/[id]/outputs/0")
        if response.status_code != 200:
            self._report("end_to_end", start, exc=RuntimeError("download failed"))
            return
        self._report("end_to_end", start, length=len(response.content))
        for name, (begin, end) in {
            "queue_wait": ("created_at", "started_at"),
            "worker": ("started_at", "finished_at"),
        }.items():
            seconds = _seconds(job, begin, end)
            if seconds is not None:
                self._report(name, start, ms=seconds * 1000)
