"""Who a request acts for: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Every /v1 route depends on CallerDep. With INSTRUCTEDIT_AUTH=disabled every request acts
as the local caller; otherwise a missing, unknown or revoked key is 401. Keys are looked
up on every request (one Redis read), so a revoked key stops working at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from services.api.errors import APIError
from services.common.api_keys import LOCAL_KEY_ID, KeyStore

# Declared as security schemes, so the OpenAPI document and /docs show both ways.
_bearer = HTTPBearer(auto_error=False, description="An API key from `keys create`")
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The same key, as a header of its own"
)


class Caller(BaseModel):
    """The key a request acts for (LOCAL_KEY_ID when auth is disabled)."""

    key_id: str
    name: str


LOCAL_CALLER = Caller(key_id=LOCAL_KEY_ID, name="local (auth disabled)")


def unauthorized(message: str) -> APIError:
    return APIError(
        401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="instructedit"'}
    )


async def get_optional_caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_api_key_header)],
) -> Caller | None:
    """The caller, or None when the request sends no key at all (a bad key is 401)."""
    if request.app.state.settings.auth == "disabled":
        return LOCAL_CALLER
    presented = bearer.credentials if bearer is not None else header_key
    if not presented:
        return None
    keys: KeyStore = request.app.state.keys
    key = await run_in_threadpool(keys.authenticate, presented.strip())
    if key is None:
        raise unauthorized("the API key is not valid (unknown, malformed or revoked)")
    request.state.key_id = key.id
    return Caller(key_id=key.id, name=key.name)


async def get_caller(
    caller: Annotated[Caller | None, Depends(get_optional_caller)],
) -> Caller:
    if caller is None:
        raise unauthorized(
            "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
        )
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]
OptionalCallerDep = Annotated[Caller | None, Depends(get_optional_caller)]
