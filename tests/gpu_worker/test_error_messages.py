"""A failed job's error message tells the client what went wrong, never where: no
absolute server path, URL or host from an exception's text reaches `job.error.message`;
the full detail is in the worker's log."""

from __future__ import annotations

import logging

import pytest

from services.common.jobs import JobError, JobErrorCode, JobStatus
from services.common.storage import FileStorage
from services.gpu_worker import celery_worker
from services.gpu_worker.edit_job import EditRunner, public_error, redact
from tests.gpu_worker.test_edit_runner import submit

SECRET_PATH = "/root/.cache/instructedit/models/unet/diffusion_pytorch_model.bin"


def assert_no_server_path(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment not in message, message
    for prefix in ("/root", "/work", "/tmp", "/home", "/var", "/srv", "/opt"):
        assert prefix not in message, message


class SplitStorage:
    """Reads from a working store, writes to one whose root became unusable (a file where
    its directory should be): every put fails the way a real FileStorage does."""

    def __init__(self, readable: FileStorage, broken: FileStorage) -> None:
        self.readable, self.broken = readable, broken

    def put(self, key, data, content_type="application/octet-stream"):
        self.broken.put(key, data, content_type)

    def __getattr__(self, name):
        return getattr(self.readable, name)


def test_outputs_that_cannot_be_stored_fail_the_job_without_server_paths(
    engine, jobs, storage, tmp_path, caplog
):
    blocked = tmp_path / "unwritable-root"
    blocked.write_text("not a directory")
    job = submit(jobs, storage, num_outputs=2)
    runner = EditRunner(engine, jobs, SplitStorage(storage, FileStorage(blocked)))
    with caplog.at_level(logging.WARNING):
        assert runner.handle(job.id) == {job.id: JobStatus.failed}
    error = jobs.get(job.id).error
    assert error.code == "storage_error"
    assert error.message == "image storage failed: could not store output 1 of 2"
    assert_no_server_path(error.message, str(tmp_path))
    # The log has what the operator needs: the storage's own words, with its path.
    assert str(blocked) in caplog.text


def test_an_unreadable_input_fails_the_job_without_server_paths(
    engine, jobs, storage, tmp_path, caplog
):
    job = submit(jobs, storage)
    # The stored input became a directory: the file store's read fails with its path.
    path = storage.root / job.input_key
    path.unlink()
    path.mkdir()
    with caplog.at_level(logging.WARNING):
        assert EditRunner(engine, jobs, storage).handle(job.id) == {job.id: JobStatus.failed}
    error = jobs.get(job.id).error
    assert error.code == "storage_error"
    assert error.message == "image storage failed: could not read the input image"
    assert_no_server_path(error.message, str(tmp_path))
    assert str(path) in caplog.text


@pytest.mark.parametrize("batch", [1, 3])
def test_an_exception_carrying_a_path_fails_the_batch_without_it(
    engine, jobs, storage, monkeypatch, caplog, batch
):
    submitted = [submit(jobs, storage, seed=i) for i in range(batch)]

    def broken(requests):
        raise FileNotFoundError(2, "No such file or directory", SECRET_PATH)

    monkeypatch.setattr(engine, "predict_batch", broken)
    with caplog.at_level(logging.WARNING):
        results = EditRunner(engine, jobs, storage, max_batch=8).handle(submitted[0].id)
    assert results == {job.id: JobStatus.failed for job in submitted}
    for job in submitted:
        error = jobs.get(job.id).error
        assert error.code == "internal_error"
        assert error.message == "the edit failed unexpectedly: FileNotFoundError"
        assert_no_server_path(error.message, SECRET_PATH)
    assert SECRET_PATH in caplog.text


def test_a_job_exception_of_its_own_fails_it_without_its_text(
    engine, jobs, storage, monkeypatch, caplog
):
    job = submit(jobs, storage)

    def one_failed(requests):
        return [RuntimeError(f"could not open {SECRET_PATH} on gpu-node-7.internal")]

    monkeypatch.setattr(engine, "predict_batch", one_failed)
    with caplog.at_level(logging.WARNING):
        assert EditRunner(engine, jobs, storage).handle(job.id) == {job.id: JobStatus.failed}
    error = jobs.get(job.id).error
    assert error.message == "the edit failed unexpectedly: RuntimeError"
    assert "gpu-node-7" not in error.message
    assert SECRET_PATH in caplog.text


class BrokenEngine:
    """An engine whose model cannot be loaded: the error names the model's files."""

    def __init__(self, model_path, options) -> None:
        self.model_path = model_path

    def setup(self):
        raise OSError(f"Error no file named diffusion_pytorch_model.bin found in {SECRET_PATH}")


def test_a_model_that_cannot_be_loaded_fails_jobs_without_its_path(
    jobs, storage, monkeypatch, caplog
):
    """The worker child's setup (celery_worker._setup_process) records the load failure
    that every job then fails with."""
    monkeypatch.setattr(celery_worker, "EditEngine", BrokenEngine)
    monkeypatch.setattr(celery_worker, "open_storage", lambda settings: storage)
    monkeypatch.setattr(celery_worker.JobReaper, "keep_sweeping", lambda self, interval: None)
    monkeypatch.setattr(celery_worker.state, "model_path", "/srv/models/instruct-pix2pix")
    monkeypatch.setattr(celery_worker.state, "runner", None)
    with caplog.at_level(logging.ERROR):
        celery_worker._setup_process()
    runner = celery_worker.state.runner
    monkeypatch.setattr(runner, "jobs", jobs)
    job = submit(jobs, storage)
    assert runner.handle(job.id) == {job.id: JobStatus.failed}
    error = jobs.get(job.id).error
    assert error.code == "model_unavailable"
    assert error.message == "the model is unavailable: the worker could not load it (OSError)"
    assert_no_server_path(error.message, SECRET_PATH, "/srv/models")
    assert SECRET_PATH in caplog.text and "/srv/models/instruct-pix2pix" in caplog.text


def test_a_detail_that_names_a_path_anyway_is_redacted(jobs, storage):
    job = submit(jobs, storage)
    runner = EditRunner(None, jobs, storage, engine_error=f"no weights in {SECRET_PATH}")
    assert runner.handle(job.id) == {job.id: JobStatus.failed}
    assert jobs.get(job.id).error.message == "the model is unavailable: no weights in <path>"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("could not store output 2 of 4", "could not store output 2 of 4"),
        ("edits/abc/input", "edits/abc/input"),  # a storage key, not a server path
        ("decoded at 1/8 scale", "decoded at 1/8 scale"),
        (f"missing {SECRET_PATH}", "missing <path>"),
        ("in '/tmp/pytest-1/storage/x'", "in '<path>'"),
        ("at C:\\models\\unet", "at <path>"),
        ("from http://minio.internal:9000/bucket/x", "from <url>"),
        ("from s3://bucket/edits/x", "from <url>"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_public_error_keeps_the_code():
    error = JobError.of(JobErrorCode.storage_error, "could not write /var/lib/x")
    assert public_error(error) == JobError(
        code=JobErrorCode.storage_error, message="image storage failed: could not write <path>"
    )
