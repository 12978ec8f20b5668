"""JSON logs: the formatter's fields, the request id binding, and the process setup."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading

import pytest

from services.common.logging import (
    JsonFormatter,
    bind_request_id,
    configure_celery_logging,
    configure_logging,
    request_id_var,
)
from tests.stack import ROOT, service_env


@pytest.fixture
def root_logger():
    """The root logger, restored as it was after the test."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    foreign = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
        for n in ("uvicorn", "uvicorn.access", "celery")
    }
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, (handlers, propagate) in foreign.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.getLogger("uvicorn.access").setLevel(logging.NOTSET)


def capture(service: str = "test") -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(service))
    logger = logging.getLogger(f"tests.logging.{service}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_record_has_service_level_message_and_extras():
    logger, stream = capture("api")
    logger.info("job %s queued", "abc", extra={"job_id": "abc", "queue": "edits"})
    (entry,) = lines(stream)
    assert entry["service"] == "api"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "tests.logging.api"
    assert entry["message"] == "job abc queued"
    assert entry["job_id"] == "abc" and entry["queue"] == "edits"
    assert entry["ts"].endswith("+00:00")
    assert "request_id" not in entry


def test_request_id_is_added_inside_the_binding_only():
    logger, stream = capture()
    with bind_request_id("req-1"):
        logger.info("inside")
        with bind_request_id("req-2", job_id="job-9"):
            logger.info("nested")
        logger.info("back")
    logger.info("outside")
    got = [(e["message"], e.get("request_id"), e.get("job_id")) for e in lines(stream)]
    assert got == [
        ("inside", "req-1", None),
        ("nested", "req-2", "job-9"),
        ("back", "req-1", None),
        ("outside", None, None),
    ]
    assert request_id_var.get() is None


def test_each_thread_logs_its_own_request_id():
    logger, stream = capture()
    barrier = threading.Barrier(2)

    def work(rid: str) -> None:
        with bind_request_id(rid):
            barrier.wait()
            logger.info("in %s", rid)

    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {e["message"]: e["request_id"] for e in lines(stream)} == {"in r0": "r0", "in r1": "r1"}


def test_exception_is_one_json_line():
    logger, stream = capture()
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("failed")
    assert len(stream.getvalue().splitlines()) == 1
    (entry,) = lines(stream)
    assert entry["level"] == "ERROR" and "ValueError: boom" in entry["exc"]


def test_configure_logging_is_idempotent_and_takes_over_server_loggers(root_logger):
    stream = io.StringIO()
    logging.getLogger("uvicorn").addHandler(logging.StreamHandler(io.StringIO()))
    logging.getLogger("uvicorn").propagate = False
    configure_logging("api", "INFO", stream=io.StringIO())
    configure_logging("api", "DEBUG", stream=stream)
    ours = [h for h in root_logger.handlers if getattr(h, "_instructedit", False)]
    assert len(ours) == 1 and root_logger.level == logging.DEBUG
    with bind_request_id("rid-7"):
        logging.getLogger("uvicorn.error").info("started")
        logging.getLogger("uvicorn.access").info("ignored: the middleware logs requests")
    (entry,) = lines(stream)
    assert entry == {**entry, "service": "api", "message": "started", "request_id": "rid-7"}


def test_text_format_keeps_the_request_id(root_logger):
    stream = io.StringIO()
    configure_logging("api", "INFO", as_json=False, stream=stream)
    with bind_request_id("rid-8"):
        logging.getLogger("x").warning("hello")
    assert "WARNING api x [request_id=rid-8]: hello" in stream.getvalue()


def test_unknown_level_is_refused(root_logger):
    with pytest.raises(ValueError):
        configure_logging("api", "LOUD")


def test_celery_receiver_takes_the_more_verbose_level_and_the_logfile(
    root_logger, tmp_path, monkeypatch
):
    from services.common.settings import get_settings

    monkeypatch.setenv("INSTRUCTEDIT_LOG_LEVEL", "INFO")
    get_settings.cache_clear()
    try:
        configure_celery_logging(loglevel=logging.WARNING, logfile=str(tmp_path / "w.log"))
        assert root_logger.level == logging.INFO
        logging.getLogger("celery.worker").info("ready")
        configure_celery_logging(loglevel="DEBUG")
        assert root_logger.level == logging.DEBUG
    finally:
        get_settings.cache_clear()
    (entry,) = [json.loads(line) for line in (tmp_path / "w.log").read_text().splitlines()]
    assert entry["service"] == "gpu_worker" and entry["message"] == "ready"


def test_celery_uses_the_receiver_instead_of_its_own_handlers():
    script = """
import logging
from celery import Celery, signals
from services.common.logging import configure_celery_logging
signals.setup_logging.connect(configure_celery_logging)
app = Celery("t")
app.log.setup_logging_subsystem(loglevel="INFO")
logging.getLogger("celery.worker").info("from celery")
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=service_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["service"], e["message"]) for e in entries] == [("gpu_worker", "from celery")]
