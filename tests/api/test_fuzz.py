"""The API fuzzed against its own OpenAPI schema (schemathesis): every operation, with a
key and without one, a bounded number of generated requests each. Whatever is sent: no
5xx that is not documented (a 503 from a dependency that is down), and every response
matches the schema: status code documented, body and headers as declared.

The app runs with a real Redis (no worker, so accepted jobs stay queued) and file storage.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.checks import response_headers_conformance

from services.api.main import create_app
from services.common.api_keys import KeyStore
from services.common.settings import Settings

EXAMPLES_PER_OPERATION = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture
def fuzz_app(redis_url, tmp_path):
    app = create_app(
        Settings(
            redis_url=redis_url,
            storage_url=f"file://{tmp_path}/storage",
            max_upload_bytes=200_000,
            # Requests that would otherwise hold the connection wait briefly.
            body_read_timeout_s=2,
        )
    )
    with TestClient(app):  # runs the lifespan
        yield app


@pytest.fixture
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


def fuzz_every_operation(schema, headers: dict[str, str]) -> int:
    """Run the generated cases of every operation; returns how many were sent. (Driven
    from here rather than by schemathesis' pytest plugin, which pytest 9 does not load.)"""
    sent = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    # Valid requests by the schema, and invalid ones (each must be a 4xx, not a crash).
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    for operation, mode in itertools.product(operations, modes):

        @given(case=operation.as_strategy(generation_mode=mode))
        @FUZZ
        def run(case) -> None:
            nonlocal sent
            # `wait` would hold a submission up to 60 s for a worker there is none of.
            if case.query:
                case.query.pop("wait", None)
            case.call_and_validate(headers=dict(headers), checks=CHECKS)
            sent += 1

        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing to make invalid (no inputs)
        except Exception as exc:
            raise AssertionError(f"{operation.label} ({mode.value}): {exc}") from exc
    return sent


def test_fuzz_with_a_key(fuzz_app, fuzz_schema):
    key = KeyStore(fuzz_app.state.redis).create("fuzz").key
    sent = fuzz_every_operation(fuzz_schema, {"Authorization": f"Bearer {key}"})
    assert sent >= EXAMPLES_PER_OPERATION  # it did run


def test_fuzz_without_a_key(fuzz_schema):
    sent = fuzz_every_operation(fuzz_schema, {})
    assert sent >= EXAMPLES_PER_OPERATION
