"""A fine-tune that dies mid-run resumes, on its next generation, from the checkpoint it
left in storage (not from scratch): FinetuneRunner, the Celery task's body, in-process on
real Redis and file storage, with the tiny model."""

from __future__ import annotations

import redis

from services.common.datasets import DatasetSpec, RunStatus, RunStore, export_prefix
from services.common.finetunes import FinetuneRequest, FinetuneStatus, FinetuneStore
from services.common.settings import Settings
from services.gpu_worker.finetune import task, train
from services.gpu_worker.finetune.config import FinetuneConfig
from tests.gpu_worker.finetune.make_dataset import write_tiny_export

CONFIG = FinetuneConfig(
    max_steps=4,
    batch_size=2,
    checkpoint_every=2,
    validation_every=0,
    holdout_rows=0,
    resolution=64,
    use_8bit_adam=False,
)


def test_a_failed_run_resumes_from_its_stored_checkpoint(
    redis_url, tmp_path, tiny_model_dir, monkeypatch
):
    settings = Settings(redis_url=redis_url, storage_url=f"file://{tmp_path}/store")
    settings = settings.model_copy(update={"model": tiny_model_dir})
    client = redis.Redis.from_url(redis_url)
    runs = RunStore(client, 3600)
    run, _ = runs.create_or_resume(DatasetSpec(num_rows=6, seed=1), "k1")
    write_tiny_export(tmp_path / "store" / export_prefix(run.id), rows=6)
    runs.transition(
        run.id, {RunStatus.queued}, status=RunStatus.succeeded, export_prefix=export_prefix(run.id)
    )
    store = FinetuneStore(client, 3600)
    request = FinetuneRequest(dataset=run.id, config=CONFIG)

    # Generation 0 dies after step 3, past the checkpoint of step 2.
    real = train.run_finetune  # the task imports it when it runs
    results = []

    def dying(*args, on_progress=None, **kwargs):
        def progress(p):
            on_progress(p)
            if p.step == 3:
                raise RuntimeError("the worker died")

        return real(*args, on_progress=progress, **kwargs)

    monkeypatch.setattr(train, "run_finetune", dying)
    first, _ = store.create_or_resume(request, "k1")
    assert task.FinetuneRunner(settings, client).run(first.id, first.generation) == "failed"
    assert store.get(first.id).status == FinetuneStatus.failed

    # Posting the same request again: generation 1, on a fresh worker (a new work dir).
    def recording(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(train, "run_finetune", recording)
    second, requeue = store.create_or_resume(request, "k1")
    assert requeue and second.generation == 1
    assert task.FinetuneRunner(settings, client).run(second.id, 1) == "succeeded"
    [result] = results
    assert result.resumed_from == 2  # from storage: the first work dir is gone
    done = store.get(second.id)
    assert done.status == FinetuneStatus.succeeded and done.adapter
    assert done.progress.step == 4
