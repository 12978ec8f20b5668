"""The `adapter` of POST /v1/edits: a registered adapter the caller may use, or 422."""

from __future__ import annotations

import pytest

from services.common.adapters import WEIGHTS_FILE, AdapterStore
from services.common.edit_params import EditParams, batch_key
from services.common.jobs import JobStore
from tests.api.conftest import keyed_client
from tests.conftest import image_bytes


@pytest.fixture
def lora_dir(tmp_path):
    directory = tmp_path / "lora"
    directory.mkdir()
    (directory / WEIGHTS_FILE).write_bytes(b"weights")  # the API never reads them
    return directory


@pytest.fixture
def adapters(client):
    return AdapterStore(client.app.state.redis)


def submit(client, **fields):
    return client.post(
        "/v1/edits",
        files={"image": ("a.png", image_bytes(), "image/png")},
        data={"prompt": "make it red", **{k: str(v) for k, v in fields.items()}},
    )


def test_a_registered_adapter_is_accepted_and_keys_the_batch(client, adapters, lora_dir):
    adapters.register(str(lora_dir), "shop style", "shop-style")
    response = submit(client, adapter="shop-style")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["params"]["adapter"] == "shop-style"
    record = JobStore(client.app.state.redis, ttl_s=60).get(job["id"])
    assert record.params.adapter == "shop-style"
    # Jobs batch only with jobs of the same adapter.
    assert record.batch_key.split(":")[-2] == "shop-style"
    assert record.batch_key == batch_key((576, 448), record.params)  # the photo's bucket
    base = submit(client).json()
    assert base["params"]["adapter"] is None


def test_an_empty_adapter_field_is_the_base_model(client):
    response = submit(client, adapter="")
    assert response.status_code == 202, response.text
    assert response.json()["params"]["adapter"] is None


@pytest.mark.parametrize(
    "adapter,code",
    [
        ("unknown", "invalid_adapter"),
        ("Not-Lowercase", "invalid_adapter"),
        ("a" * 65, "invalid_adapter"),
        ("../etc", "invalid_adapter"),
    ],
)
def test_unknown_or_malformed_adapters_are_422_and_store_nothing(
    client, queue_len, job_keys, stored, adapter, code
):
    response = submit(client, adapter=adapter)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert queue_len() == 0 and job_keys() == [] and stored() == []


def test_the_unknown_adapters_message_names_it(client):
    error = submit(client, adapter="nope").json()["error"]
    assert error["code"] == "invalid_adapter"
    assert "no adapter with id 'nope'" in error["message"]


def test_a_keys_own_adapter_is_invisible_to_other_keys(client, adapters, lora_dir, job_keys):
    adapters.register(str(lora_dir), "mine", "private-one", owner=client.key_id)
    assert submit(client, adapter="private-one").status_code == 202
    with keyed_client(client.app) as other:
        response = submit(other, adapter="private-one")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_adapter"
    assert len(job_keys()) == 1  # only the owner's job


def test_operator_adapters_are_public(client, adapters, lora_dir):
    adapters.register(str(lora_dir), "public", "public-one")
    with keyed_client(client.app) as other:
        assert submit(other, adapter="public-one").status_code == 202
    assert submit(client, adapter="public-one").status_code == 202


def test_the_form_documents_the_adapter(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    fields = [
        s["properties"]["adapter"] for s in schemas.values() if "adapter" in s.get("properties", {})
    ]
    assert fields and all("LoRA adapter id" in field["description"] for field in fields)
    assert EditParams(prompt="x").adapter is None
