"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.api.deps import CeleryDep, RedisDep, StorageDep
from services.api.schemas import ReadinessResponse
from services.common.workers import EngineStatus, WorkerRegistry

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=ReadinessResponse, responses={503: {"model": ReadinessResponse}}
)
def readyz(redis: RedisDep, storage: StorageDep, celery: CeleryDep) -> JSONResponse:
    checks = {"redis": "ok", "storage": "ok"}
    try:
        redis.ping()
    except Exception as exc:
        checks["redis"] = f"error: {exc}"
    try:
        storage.ping()
    except Exception as exc:
        checks["storage"] = f"error: {exc}"
    workers: list[str] = []
    engines: list[EngineStatus] = []
    if checks["redis"] == "ok":
        replies = celery.control.ping(timeout=0.5) or []
        workers = sorted(name for reply in replies for name in reply)
        engines = WorkerRegistry(redis).ready_engines()
    ready = all(v == "ok" for v in checks.values())
    body = ReadinessResponse(ready=ready, workers=workers, engines=engines, **checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)
