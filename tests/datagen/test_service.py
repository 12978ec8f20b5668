"""The datagen service end to end: /v1/datasets on the API, a real datagen Celery worker
process with a tiny Stable Diffusion, file storage, and the exported Parquet dataset."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from services.datagen.tiny_clip import write_tiny_clip
from services.datagen.tiny_sd import write_tiny_stable_diffusion
from tests.stack import free_port, service_env, start_api, start_datagen_worker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def datagen_stack(claim_redis_db, tmp_path_factory):
    model = write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd")
    clip = write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")
    storage = tmp_path_factory.mktemp("datagen-storage")
    logs = tmp_path_factory.mktemp("datagen-logs")
    env = service_env(
        redis_url=claim_redis_db(),
        storage_url=f"file://{storage}",
        datagen_model=str(model),
        # The CLIP model a spec may name for its filter.
        datagen_clip_models=str(clip),
        device="cpu",
        # One local caller (ownership and keys: tests/api/test_datasets.py).
        auth="disabled",
    )
    worker = start_datagen_worker(env, logs)
    port = free_port()
    api = start_api(env, logs, port)
    yield {
        "base": f"http://127.0.0.1:{port}",
        "storage": storage,
        "worker": worker,
        "clip": str(clip),
    }
    api.stop()
    worker.stop()


def spec(**overrides) -> dict:
    return {
        "num_rows": 3,
        "seed": 11,
        "pairs_per_row": 2,
        "num_inference_steps": 2,
        "resolution": 64,
        "filter": False,
        **overrides,
    }


def wait(client, run_id, statuses, timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/v1/datasets/{run_id}").json()
        if run["status"] in statuses:
            return run
        time.sleep(0.2)
    raise TimeoutError(run)


def test_run_generates_and_exports_a_loadable_dataset(datagen_stack):
    from datasets import load_dataset
    from PIL import Image

    with httpx.Client(base_url=datagen_stack["base"], timeout=30) as client:
        response = client.post("/v1/datasets", json=spec())
        assert response.status_code == 202, response.text
        run = response.json()
        assert response.headers["location"] == f"/v1/datasets/{run['id']}"
        assert run["progress"]["rows_total"] == 3
        done = wait(client, run["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert done["progress"] == {
            "rows_done": 3,
            "rows_total": 3,
            "pairs_generated": 6,
            "pairs_kept": 6,
        }
        # The same spec again is the same run: nothing is generated twice.
        again = client.post("/v1/datasets", json=spec())
        assert again.json()["id"] == run["id"]
        assert again.json()["status"] == "succeeded"

    storage = Path(datagen_stack["storage"])
    shards = [storage / key for key in done["export_files"] if key.endswith(".parquet")]
    assert shards and all(p.is_file() for p in shards)
    card = storage / done["export_prefix"] / "dataset_card.md"
    assert card.is_file()
    dataset = load_dataset("parquet", data_files=[str(p) for p in shards], split="train")
    assert dataset.num_rows == 6
    # diffusers' train_instruct_pix2pix.py column defaults.
    assert {"input_image", "edit_prompt", "edited_image"} <= set(dataset.column_names)
    first = dataset[0]
    assert isinstance(first["input_image"], Image.Image)
    assert first["input_image"].size == (64, 64)
    assert first["edit_prompt"]


def test_bad_specs_are_rejected(datagen_stack):
    with httpx.Client(base_url=datagen_stack["base"]) as client:
        for bad in (
            {"pairs_per_row": 2},  # neither rows nor num_rows
            spec(num_rows=0),
            spec(p_range=[0.9, 0.1]),
            spec(resolution=65),
            spec(rows=[{"input_caption": "a", "instruction": "b", "output_caption": "c"}]),
            spec(num_rows=None, rows=[]),
            spec(model="/etc/passwd"),
        ):
            response = client.post("/v1/datasets", json=bad)
            assert response.status_code == 422, bad
            assert response.json()["error"]["message"]
        assert client.get("/v1/datasets/nope").status_code == 404


def test_cancel_then_resume_skips_stored_rows(datagen_stack):
    storage = Path(datagen_stack["storage"])
    big = spec(num_rows=16, seed=5, pairs_per_row=1)
    with httpx.Client(base_url=datagen_stack["base"], timeout=30) as client:
        run = client.post("/v1/datasets", json=big).json()
        wait(client, run["id"], {"running"})
        deadline = time.monotonic() + 120
        while client.get(f"/v1/datasets/{run['id']}").json()["progress"]["rows_done"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        canceled = client.post(f"/v1/datasets/{run['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        time.sleep(1.0)  # the worker stops at its next row
        rows_dir = storage / "datasets" / run["id"] / "rows"
        stored_before = {p.name: p.stat().st_mtime_ns for p in rows_dir.iterdir()}
        assert 3 <= len(stored_before) < 16
        # Canceling it again: the run as it stands.
        again = client.post(f"/v1/datasets/{run['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "canceled"

        resumed = client.post("/v1/datasets", json=big).json()
        assert resumed["id"] == run["id"] and resumed["status"] == "queued"
        done = wait(client, run["id"], {"succeeded", "failed"}, timeout=300)
        assert done["status"] == "succeeded", done
        assert done["progress"]["rows_done"] == 16
    # Rows made before the cancel were not made again.
    after = {p.name: p.stat().st_mtime_ns for p in rows_dir.iterdir()}
    assert all(after[name] == mtime for name, mtime in stored_before.items())


def test_a_filtered_run_that_keeps_no_pair_fails_with_no_pairs_kept(datagen_stack):
    """The CLIP filter in the worker passes no candidate: the run ends failed with a clear
    error code instead of exporting a dataset `datasets` cannot load."""
    filtered = spec(
        num_rows=2,
        seed=21,
        filter=True,
        clip_model=datagen_stack["clip"],
        candidates_per_row=3,
        candidate_batch_size=2,
        # The tiny CLIP's directional similarity of random pictures never reaches 1.
        min_directional_similarity=1.0,
    )
    with httpx.Client(base_url=datagen_stack["base"], timeout=30) as client:
        response = client.post("/v1/datasets", json=filtered)
        assert response.status_code == 202, response.text
        run = response.json()
        assert run["spec"]["filter"] is True and run["spec"]["candidates_per_row"] == 3
        done = wait(client, run["id"], {"succeeded", "failed"})
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "no_pairs_kept"
    assert "6 candidate pair(s)" in done["error"]["message"]
    assert done["progress"]["pairs_generated"] == 6 and done["progress"]["pairs_kept"] == 0
    assert done["export_files"] == []
    assert not (Path(datagen_stack["storage"]) / "datasets" / run["id"] / "export").exists()
