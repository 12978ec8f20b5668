"""The adapter store, and `python -m services.api adapters register|list|remove`."""

from __future__ import annotations

import json

import pytest
import redis

from services.api.__main__ import main
from services.common.adapters import (
    WEIGHTS_FILE,
    AdapterInvalid,
    AdapterNotFound,
    AdapterStore,
)
from services.common.settings import get_settings
from services.common.storage import FileStorage


@pytest.fixture
def store(redis_url) -> AdapterStore:
    return AdapterStore(redis.Redis.from_url(redis_url))


@pytest.fixture
def lora_dir(tmp_path):
    directory = tmp_path / "lora"
    directory.mkdir()
    (directory / WEIGHTS_FILE).write_bytes(b"weights")
    return directory


def test_register_get_list_remove(store, lora_dir):
    made = store.register(str(lora_dir), "shop style", "shop-style")
    assert made.id == "shop-style" and made.owner is None
    assert made.location == str(lora_dir.resolve())
    assert store.get("shop-style") == made
    other = store.register(f"file://{lora_dir}", "private", owner="k1")
    assert len(other.id) == 12 and other.owner == "k1"
    assert [a.id for a in store.list()] == ["shop-style", other.id]
    assert [a.id for a in store.list("k2", all_owners=False)] == ["shop-style"]
    assert other.visible_to("k1") and not other.visible_to("k2") and made.visible_to("k2")
    assert store.remove("shop-style") == made
    assert store.get("shop-style") is None
    with pytest.raises(AdapterNotFound):
        store.remove("shop-style")


def test_registering_again_gets_a_new_revision(store, lora_dir):
    first = store.register(str(lora_dir), "a", "a")
    with pytest.raises(AdapterInvalid, match="already exists"):
        store.register(str(lora_dir), "a", "a")
    store.remove("a")
    assert store.register(str(lora_dir), "a", "a").revision != first.revision


@pytest.mark.parametrize("adapter_id", ["Upper", "-lead", "a.b", "a" * 65, "", "a/b"])
def test_ids_are_checked(store, lora_dir, adapter_id):
    with pytest.raises(AdapterInvalid, match="adapter id"):
        store.register(str(lora_dir), "x", adapter_id)
    assert store.get(adapter_id) is None


def test_the_weights_must_be_there(store, tmp_path):
    with pytest.raises(AdapterInvalid, match="not a directory"):
        store.register(str(tmp_path / "missing"), "x")
    with pytest.raises(AdapterInvalid, match=WEIGHTS_FILE):
        store.register(str(tmp_path), "x")
    assert store.list() == []


def test_storage_locations(redis_url, tmp_path):
    storage = FileStorage(tmp_path / "storage")
    store = AdapterStore(redis.Redis.from_url(redis_url), storage)
    with pytest.raises(AdapterInvalid, match="storage has no"):
        store.register("storage:adapters/x", "x")
    storage.put(f"adapters/x/{WEIGHTS_FILE}", b"weights")
    adapter = store.register("storage:adapters/x/", "x", "x")
    assert adapter.location == "storage:adapters/x"
    assert adapter.storage_prefix == "adapters/x"


@pytest.fixture
def cli(redis_url, monkeypatch, capsys):
    monkeypatch.setenv("INSTRUCTEDIT_REDIS_URL", redis_url)
    get_settings.cache_clear()

    def run(*argv: str) -> tuple[int, list[dict], str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, [json.loads(line) for line in out.splitlines()], err

    yield run
    get_settings.cache_clear()


def test_cli_register_list_remove(cli, lora_dir, store):
    code, (made,), _ = cli("adapters", "register", str(lora_dir), "--name", "shop style")
    assert code == 0 and made["name"] == "shop style" and made["owner"] is None
    assert store.get(made["id"]) is not None
    code, (named,), _ = cli("adapters", "register", str(lora_dir), "--name", "b", "--id", "b-1")
    assert named["id"] == "b-1"
    code, listed, _ = cli("adapters", "list")
    assert code == 0 and [a["id"] for a in listed] == [made["id"], "b-1"]
    code, (removed,), _ = cli("adapters", "remove", "b-1")
    assert code == 0 and removed["id"] == "b-1"
    assert store.get("b-1") is None


def test_cli_errors(cli, tmp_path, lora_dir):
    code, _, err = cli("adapters", "register", str(tmp_path), "--name", "x")
    assert code == 2 and WEIGHTS_FILE in err
    code, _, err = cli("adapters", "register", str(lora_dir), "--name", "x", "--id", "Bad")
    assert code == 2 and "adapter id" in err
    code, _, err = cli("adapters", "remove", "nope")
    assert code == 1 and "no adapter with id 'nope'" in err
