"""Worker metrics: what each observe_* records, and the parent's server summing its forked
children's samples (Celery's prefork pool), in a fresh interpreter each time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.common.edit_params import EditParams
from services.common.jobs import EditJob, JobError, JobStatus, Progress, utcnow
from services.gpu_worker import metrics
from tests.stack import ROOT, free_port, service_env

JOB_HELPER = """
from datetime import timedelta
from services.common.jobs import EditJob, JobError, JobStatus, Progress, utcnow
from services.common.edit_params import EditParams

def job(status, step=10, code=None, waited=3.0, ran=1.0):
    now = utcnow()
    new = EditJob.new(EditParams(prompt="x", num_inference_steps=10), "image/png")
    return new.model_copy(update=dict(
        status=status,
        created_at=now - timedelta(seconds=waited + ran),
        started_at=now - timedelta(seconds=ran),
        finished_at=now,
        progress=Progress(step=step, total=10),
        error=JobError(code=code, message="m") if code else None,
    ))
"""


def run_python(script: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**service_env(), **env}
    result = subprocess.run(
        [sys.executable, "-c", JOB_HELPER + textwrap.dedent(script)],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def make_job(status, step=10, code=None, waited=3.0, ran=1.0) -> EditJob:
    now = utcnow()
    job = EditJob.new(EditParams(prompt="x", num_inference_steps=10), "image/png")
    return job.model_copy(
        update={
            "status": status,
            "created_at": now - timedelta(seconds=waited + ran),
            "started_at": now - timedelta(seconds=ran),
            "finished_at": now,
            "progress": Progress(step=step, total=10),
            "error": JobError(code=code, message="m") if code else None,
        }
    )


def test_server_in_the_parent_sums_the_samples_of_forked_children(tmp_path):
    port = free_port()
    result = run_python(
        f"""
        import json, multiprocessing, os, urllib.request
        from services.gpu_worker import metrics

        metrics.start_metrics_server({port}, addr="127.0.0.1")
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]

        def child(code):
            ok = job(JobStatus.succeeded, step=10, waited=2.0, ran=1.0)
            metrics.observe_job_started(ok)
            metrics.observe_job_finished(ok, engine_seconds=0.5)  # 20 steps/s
            failed = job(JobStatus.failed, step=4, code=code, waited=4.0, ran=0.5)
            metrics.observe_job_started(failed)
            metrics.observe_job_finished(failed, engine_seconds=0.4)  # 10 steps/s
            metrics.observe_gpu_memory()

        fork = multiprocessing.get_context("fork")
        for code in ("out_of_memory", "timeout"):  # two pool children, one after the other
            p = fork.Process(target=child, args=(code,))
            p.start()
            p.join()
            assert p.exitcode == 0
        text = urllib.request.urlopen("http://127.0.0.1:{port}/metrics").read().decode()
        print(json.dumps({{"text": text, "dir": directory}}))
        """,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    out = json.loads(result.stdout.splitlines()[-1])
    got = samples(out["text"])

    def value(name, **labels):
        return got.get((name, frozenset(labels.items())))

    assert value("instructedit_worker_queue_wait_seconds_count") == 4
    assert value("instructedit_worker_queue_wait_seconds_sum") == 12.0
    assert value("instructedit_worker_job_duration_seconds_count", status="succeeded") == 2
    assert value("instructedit_worker_job_duration_seconds_sum", status="succeeded") == 2.0
    assert value("instructedit_worker_job_duration_seconds_count", status="failed") == 2
    assert value("instructedit_worker_engine_seconds_sum", status="failed") == 0.8
    assert value("instructedit_worker_job_failures_total", code="out_of_memory") == 1
    assert value("instructedit_worker_job_failures_total", code="timeout") == 1
    assert value("instructedit_worker_steps_per_second_count") == 4
    assert value("instructedit_worker_steps_per_second_sum") == 60.0
    assert value("instructedit_worker_steps_per_second_bucket", le="10.0") == 2
    # No CUDA here: no GPU series, and torch was never imported for them.
    assert "instructedit_worker_gpu_memory_allocated_bytes{" not in out["text"]
    # A fresh directory under the configured one, removed when the worker exits.
    assert out["dir"].startswith(str(tmp_path / "gpu-worker-"))
    assert list(tmp_path.iterdir()) == []


def test_port_taken_or_zero_leaves_the_worker_running():
    port = free_port()
    result = run_python(
        f"""
        import logging, os, socket
        logging.basicConfig(level=logging.INFO)
        from services.gpu_worker import metrics

        metrics.start_metrics_server(0)
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", {port}))
            taken.listen()
            metrics.start_metrics_server({port}, addr="127.0.0.1")
        metrics.observe_job_finished(job(JobStatus.succeeded), 0.5)
        print("still running")
        """
    )
    assert "still running" in result.stdout
    assert "worker metrics are off" in result.stderr
    assert "worker metrics server not started" in result.stderr


def test_observations_in_a_process_without_server():
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    name = "instructedit_worker_job_duration_seconds_count"
    before = value(name, status="canceled"), value("instructedit_worker_steps_per_second_count")
    canceled = make_job(JobStatus.canceled, step=3)
    metrics.observe_job_started(canceled)
    metrics.observe_job_finished(canceled, engine_seconds=0.3)
    assert value(name, status="canceled") == before[0] + 1
    assert value("instructedit_worker_steps_per_second_count") == before[1] + 1

    # A job that never reached the engine: no engine time, no speed.
    failed = make_job(JobStatus.failed, step=0, code="input_missing")
    failures = value("instructedit_worker_job_failures_total", code="input_missing")
    metrics.observe_job_finished(failed, engine_seconds=0.0)
    assert value("instructedit_worker_job_failures_total", code="input_missing") == failures + 1
    assert value("instructedit_worker_steps_per_second_count") == before[1] + 1


def test_observing_never_raises(caplog):
    metrics.observe_job_finished(None, 1.0)  # type: ignore[arg-type]
    metrics.observe_job_started(make_job(JobStatus.running).model_copy(update={"started_at": None}))
    metrics.observe_gpu_memory()
    assert "recording metrics in observe_job_finished failed" in caplog.text


def test_runner_observer_records_start_and_end():
    def count():
        return REGISTRY.get_sample_value("instructedit_worker_queue_wait_seconds_count") or 0.0

    name = "instructedit_worker_job_duration_seconds_count"
    before = count(), REGISTRY.get_sample_value(name, {"status": "succeeded"}) or 0.0
    observer = metrics.MetricsObserver()
    job = make_job(JobStatus.succeeded)
    observer.job_started(job)
    observer.job_finished(job, 0.5)
    assert count() == before[0] + 1
    assert REGISTRY.get_sample_value(name, {"status": "succeeded"}) == before[1] + 1
