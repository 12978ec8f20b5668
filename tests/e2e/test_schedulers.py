"""Every sampler through the real stack: a job with `scheduler` set is pixel-identical to
diffusers' stock InstructPix2Pix pipeline with that scheduler set."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.common.schedulers import Scheduler
from tests.conftest import image_bytes
from tests.e2e.test_edit_flow import direct_pipeline_outputs, submit

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished_jobs(stack):
    """One job per sampler, all queued at once (each sampler is its own batch key)."""
    photo = image_bytes((128, 128))  # a bucket of the tiny model: run as it is
    with stack.client() as client:
        jobs = {
            name: submit(
                client,
                photo,
                prompt="change its color to grey",
                scheduler=name.value,
                num_inference_steps=4,
                seed=31,
            )
            for name in Scheduler
        }
        done = {name: stack.wait_finished(job["id"]) for name, job in jobs.items()}
        outputs = {
            name: np.asarray(Image.open(io.BytesIO(client.get(job["outputs"][0]["url"]).content)))
            for name, job in done.items()
            if job["status"] == "succeeded"
        }
    return photo, done, outputs


@pytest.mark.parametrize("name", list(Scheduler))
def test_a_job_with_a_scheduler_matches_the_stock_pipeline_with_it(
    finished_jobs, tiny_model_dir, name
):
    photo, done, outputs = finished_jobs
    job = done[name]
    assert job["status"] == "succeeded", job
    assert job["params"]["scheduler"] == name.value
    # The stock pipeline with the job's sampler set (tests/reference.py).
    (expected,) = direct_pipeline_outputs(tiny_model_dir, photo, job["params"])
    assert np.array_equal(outputs[name], expected)


def test_samplers_give_different_pictures(finished_jobs):
    _, _, outputs = finished_jobs
    pictures = {name: image.tobytes() for name, image in outputs.items()}
    assert len(set(pictures.values())) == len(Scheduler)
