"""Structured logs for every service: one JSON object per line, with the request id.

The API's middleware binds the request id of each HTTP request (`bind_request_id`); the
job record carries it to the worker, which binds it again around the job, so one id
finds every line that one edit produced, in the API and in the worker.

    configure_logging("api", "INFO")                      # a process's entry point
    signals.setup_logging.connect(configure_celery_logging)  # a Celery worker
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

request_id_var: ContextVar[str | None] = ContextVar("instructedit_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("instructedit_job_id", default=None)

# What every LogRecord has; anything else on a record came from `extra=` and is logged
# (except uvicorn's ANSI-coloured copy of its message).
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName", "color_message", "service", "context"}
)
# Loggers of servers that install handlers of their own; their records go to ours instead.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "gunicorn.error")


@contextmanager
def bind_request_id(request_id: str | None, job_id: str | None = None) -> Iterator[None]:
    """Log every record inside the block with `request_id` (and `job_id`, when given)."""
    token = request_id_var.set(request_id)
    job_token = job_id_var.set(job_id) if job_id is not None else None
    try:
        yield
    finally:
        if job_token is not None:
            job_id_var.reset(job_token)
        request_id_var.reset(token)


def _context_fields(record: logging.LogRecord) -> dict[str, str]:
    fields = {}
    request_id = getattr(record, "request_id", None) or request_id_var.get()
    if request_id:
        fields["request_id"] = request_id
    job_id = getattr(record, "job_id", None) or job_id_var.get()
    if job_id:
        fields["job_id"] = job_id
    return fields


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "service", "logger", "message", "request_id", "job_id", ...}`."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context_fields(record))
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        entry["process"] = record.process
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal (log_json=false), still with the request id."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)s %(service)s %(name)s%(context)s: %(message)s")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        record.service = self.service
        fields = _context_fields(record)
        record.context = "".join(f" [{k}={v}]" for k, v in fields.items())
        return super().format(record)


def _level(level: str | int | None) -> int:
    if level is None:
        return logging.INFO
    if isinstance(level, int):
        return level
    value = logging.getLevelName(str(level).upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


def configure_logging(
    service: str,
    level: str | int | None = "INFO",
    as_json: bool = True,
    stream: IO[str] | None = None,
) -> None:
    """Send every log record of this process to `stream` as JSON lines (or text) at `level`.

    The stream defaults to the process's real stderr (not `sys.stderr`, which Celery
    redirects into logging itself and test runners swap). Idempotent; the handlers of
    uvicorn and Celery are removed so that their records come out here too, with the id.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_instructedit", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
    handler._instructedit = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter(service) if as_json else TextFormatter(service))
    root.addHandler(handler)
    root.setLevel(_level(level))
    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
    # The API's middleware logs every request with its id, status and duration.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def configure_celery_logging(
    loglevel: str | int | None = None,
    logfile: str | None = None,
    service: str = "gpu_worker",
    **_: Any,
) -> None:
    """Celery `setup_logging` receiver: the worker logs through `configure_logging`.

    Connected (`signals.setup_logging.connect(configure_celery_logging)`), it keeps Celery
    from installing handlers of its own. The level is the more verbose of `--loglevel` and
    INSTRUCTEDIT_LOG_LEVEL; `--logfile` is honoured.
    """
    from services.common.settings import get_settings

    settings = get_settings()
    level = _level(settings.log_level)
    if loglevel:
        level = min(level, _level(loglevel))
    stream = open(logfile, "a", buffering=1, encoding="utf-8") if logfile else None  # noqa: SIM115
    configure_logging(service, level, as_json=settings.log_json, stream=stream)
