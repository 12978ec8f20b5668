"""The web page: upload a photo, edit it by instruction, follow the job, compare.

Plain static files (services/api/static/ui/, no build step) that call the public API from
the browser, exactly as any client does. Not part of the API: kept out of the OpenAPI
schema.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from services.api.errors import APIError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static" / "ui"

# Only these files are served: no path from the request ever reaches the file system.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# The page changes with the API: browsers revalidate rather than run a stale copy.
_HEADERS = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
@router.get("/ui/")
def page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS
    )


@router.get("/ui/{asset}")
def asset(asset: str) -> FileResponse:
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise APIError(404, "not_found", f"no UI file {asset!r}")
    return FileResponse(STATIC_DIR / asset, media_type=media_type, headers=_HEADERS)
