"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.api.deps import CeleryDep, RedisDep, StorageDep
from services.api.schemas import ReadinessResponse
from services.common.storage import check_writable
from services.common.workers import EngineStatus, WorkerRegistry

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

# What /readyz says of each dependency. It is public: the cause of a failure (hosts,
# ports, endpoints, paths) goes to the log, not into the answer.
OK, UNAVAILABLE = "ok", "unavailable"


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=ReadinessResponse, responses={503: {"model": ReadinessResponse}}
)
def readyz(redis: RedisDep, storage: StorageDep, celery: CeleryDep) -> JSONResponse:
    checks = {"redis": OK, "storage": OK}
    try:
        redis.ping()
    except Exception as exc:
        log.warning("readiness: Redis is unavailable: %r", exc)
        checks["redis"] = UNAVAILABLE
    try:
        storage.ping()
        # Reads alone would let the API accept uploads it cannot store.
        check_writable(storage)
    except Exception as exc:
        log.warning("readiness: storage is unavailable: %r", exc)
        checks["storage"] = UNAVAILABLE
    workers: list[str] = []
    engines: list[EngineStatus] = []
    if checks["redis"] == OK:
        replies = celery.control.ping(timeout=0.5) or []
        workers = sorted(name for reply in replies for name in reply)
        engines = WorkerRegistry(redis).ready_engines()
    ready = all(v == OK for v in checks.values())
    body = ReadinessResponse(ready=ready, workers=workers, engines=engines, **checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)
