"""The worker process itself: refusing to start without a model, surviving a dead child."""

from __future__ import annotations

import signal

import psutil
import pytest

from services.common.edit_params import EditParams
from services.common.jobs import EditJob, JobStore
from services.common.storage import FileStorage
from tests.conftest import image_bytes
from tests.e2e.test_edit_flow import LONG, long_photo, submit
from tests.stack import service_env, start_worker

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "model,expected",
    [
        ("timbrooks/instruct-pix2pix", "could not be downloaded from the Hugging Face Hub"),
        ("/nonexistent/model/dir", "does not exist"),
    ],
)
def test_worker_without_model_stops_at_start_with_one_clear_message(
    tmp_path, redis_url, model, expected
):
    env = service_env(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}/storage",
        model=model,
    )
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache; HF_HUB_OFFLINE=1 keeps it offline
    worker = start_worker(env, tmp_path, name="nomodel")
    try:
        code = worker.proc.wait(timeout=120)
    finally:
        worker.stop()
    log = worker.log()
    assert code != 0
    lines = [line for line in log.splitlines() if "instructedit worker cannot start" in line]
    assert len(lines) == 1, log
    assert expected in lines[0]
    assert "INSTRUCTEDIT_MODEL" in lines[0] and "MODEL=tiny" in lines[0]
    assert "ForkPoolWorker" not in log  # no child was ever started


def test_job_survives_its_worker_child_being_killed(stack):
    """acks_late + reject_on_worker_lost: the job goes back to the queue and a fresh child
    (with the model loaded again) runs it to the end."""
    with stack.client() as client:
        job = submit(client, long_photo(), **{**LONG, "num_inference_steps": 30})
        stack.wait_for(job["id"], lambda j: j["progress"]["step"] >= 2)
        parent = psutil.Process(stack.worker.proc.pid)
        (child,) = parent.children()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        done = stack.wait_finished(job["id"], timeout=180)
        assert done["status"] == "succeeded", done
        assert done["progress"] == {"step": 30, "total": 30}
        assert client.get(done["outputs"][0]["url"]).status_code == 200
        # The replacement child serves later jobs too.
        later = submit(client, image_bytes(), num_inference_steps=1)
        assert stack.wait_finished(later["id"])["status"] == "succeeded"
    new_children = psutil.Process(stack.worker.proc.pid).children()
    assert len(new_children) == 1 and new_children[0].pid != child.pid


def test_an_accepted_job_whose_message_was_lost_still_runs(stack):
    """The API accepted the job (record, input) but its queue message never reached the
    broker: the workers' reaper sends it again once it is overdue."""
    store = JobStore(stack.redis, ttl_s=600, redeliver_after_s=1)
    storage = FileStorage(stack.settings["storage_url"].removeprefix("file://"))
    data = image_bytes((64, 48))
    job = EditJob.new(
        EditParams(prompt="make it red", num_inference_steps=2), "image/png", owner=stack.key.id
    )
    storage.put(job.input_key, data, "image/png")
    store.create(job)  # and no message
    done = stack.wait_finished(job.id, timeout=60)
    assert done["status"] == "succeeded", done
    assert "sending it to the queue again" in stack.worker.log()
