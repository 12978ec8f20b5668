"""The SDK against the real stack (tests/e2e/conftest.py): a real API over HTTP, a real
Celery worker with the tiny model, real Redis."""

from __future__ import annotations

import httpx
import pytest

from instructedit import Client
from services.common.api_keys import KeyStore


class Recorder(httpx.BaseTransport):
    """A real HTTP transport that notes every request and response it carries, and can
    refuse some paths (as if the network dropped them)."""

    def __init__(self, refuse: str | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.refuse = refuse
        self.exchanges: list[tuple[httpx.Request, httpx.Response | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.refuse and self.refuse in request.url.path:
            self.exchanges.append((request, None))
            raise httpx.ConnectError("refused by the test", request=request)
        response = self.inner.handle_request(request)
        self.exchanges.append((request, response))
        return response

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def client(stack):
    with Client(stack.base_url, stack.key.key, timeout=30) as c:
        yield c


@pytest.fixture
def own_key(stack):
    """A key of this test's own: a listing shows only what the test made."""
    return KeyStore(stack.redis).create("sdk-tests").key
