"""KeyStore against a real Redis: keys are made, checked, listed and revoked; Redis never
holds a key itself."""

import hashlib
import re

import pytest
import redis

from services.common.api_keys import (
    KEY_PREFIX,
    LOCAL_KEY_ID,
    ApiKey,
    CreatedKey,
    KeyNotFound,
    KeyStore,
)


@pytest.fixture
def keys(redis_url):
    return KeyStore(redis.Redis.from_url(redis_url))


def every_name_and_value(client: redis.Redis) -> list[bytes]:
    """Every key name and every value (of any type) in the database."""
    out: list[bytes] = []
    for name in client.scan_iter():
        out.append(name)
        kind = client.type(name)
        if kind == b"string":
            out.append(client.get(name))
        elif kind == b"hash":
            for field, value in client.hgetall(name).items():
                out += [field, value]
        elif kind == b"zset":
            out += [member for member, _ in client.zrange(name, 0, -1, withscores=True)]
        elif kind == b"list":
            out += client.lrange(name, 0, -1)
        elif kind == b"set":
            out += list(client.smembers(name))
    return out


def test_created_key_has_the_documented_shape(keys):
    created = keys.create("shop")
    assert isinstance(created, CreatedKey)
    assert created.name == "shop"
    assert re.fullmatch(r"[0-9a-f]{12}", created.id)
    prefix, key_id, secret = created.key.split("_", 2)
    assert prefix == KEY_PREFIX == "ie"
    assert key_id == created.id
    # 32 random bytes, URL-safe base64 without padding.
    assert len(secret) >= 43
    assert created.webhook_secret.startswith("whsec_")
    assert len(created.webhook_secret) > len("whsec_") + 40


def test_keys_and_secrets_differ_each_time(keys):
    a, b = keys.create("a"), keys.create("a")
    assert a.id != b.id and a.key != b.key and a.webhook_secret != b.webhook_secret


def test_authenticate_returns_the_active_key(keys):
    created = keys.create("shop")
    found = keys.authenticate(created.key)
    assert isinstance(found, ApiKey)
    assert (found.id, found.name, found.active, found.revoked_at) == (
        created.id,
        "shop",
        True,
        None,
    )


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: "",
        lambda k: "ie",
        lambda k: "ie__",
        lambda k: k[:-1],  # wrong secret
        lambda k: k + "x",  # wrong secret
        lambda k: k.replace("ie_", "xx_", 1),  # wrong prefix
        lambda k: k.split("_", 2)[0] + "_" + k.split("_", 2)[1],  # no secret
        lambda k: "ie_" + "0" * 12 + "_" + k.split("_", 2)[2],  # unknown id, right secret
        lambda k: "ie_ZZZZ_" + k.split("_", 2)[2],  # id not hex
        lambda k: k + "a" * 200,  # too long
        lambda k: k.upper(),
    ],
)
def test_authenticate_refuses_anything_else(keys, mangle):
    created = keys.create("shop")
    assert keys.authenticate(mangle(created.key)) is None
    assert keys.authenticate(created.key) is not None


def test_redis_keeps_only_a_digest_of_the_key(keys):
    created = keys.create("shop")
    values = every_name_and_value(keys.redis)
    secret = created.key.split("_", 2)[2].encode()
    assert not any(secret in value for value in values)
    assert not any(created.key.encode() in value for value in values)
    # ...the SHA-256 of the whole key is what it compares against.
    digest = hashlib.sha256(created.key.encode()).hexdigest().encode()
    assert any(digest == value for value in values)


def test_revoked_key_does_not_authenticate(keys):
    created = keys.create("shop")
    other = keys.create("other")
    revoked = keys.revoke(created.id)
    assert revoked.id == created.id and not revoked.active
    assert revoked.revoked_at is not None
    assert keys.authenticate(created.key) is None
    # Revoking one key leaves the others alone.
    assert keys.authenticate(other.key).id == other.id


def test_revoking_twice_keeps_the_first_time(keys):
    created = keys.create("shop")
    first = keys.revoke(created.id).revoked_at
    assert keys.revoke(created.id).revoked_at == first


def test_revoking_an_unknown_key_raises(keys):
    with pytest.raises(KeyNotFound):
        keys.revoke("0123456789ab")
    with pytest.raises(KeyNotFound):
        keys.revoke(LOCAL_KEY_ID)


def test_local_key_cannot_be_revoked_even_once_it_exists(keys):
    keys.webhook_secret(LOCAL_KEY_ID)  # makes its record
    with pytest.raises(KeyNotFound):
        keys.revoke(LOCAL_KEY_ID)


def test_list_is_oldest_first_without_secrets(keys):
    made = [keys.create(name) for name in ("a", "b", "c")]
    keys.revoke(made[1].id)
    listed = keys.list()
    assert [k.id for k in listed] == [m.id for m in made]
    assert [k.name for k in listed] == ["a", "b", "c"]
    assert [k.active for k in listed] == [True, False, True]
    for key in listed:
        dumped = key.model_dump_json()
        assert "digest" not in dumped and "webhook_secret" not in dumped
        assert not any(m.key in dumped or m.webhook_secret in dumped for m in made)


def test_get_and_webhook_secret(keys):
    created = keys.create("shop")
    assert keys.get(created.id).name == "shop"
    assert keys.webhook_secret(created.id) == created.webhook_secret
    with pytest.raises(KeyNotFound):
        keys.get("0123456789ab")
    with pytest.raises(KeyNotFound):
        keys.webhook_secret("0123456789ab")


def test_local_webhook_secret_is_made_once(keys):
    first = keys.webhook_secret(LOCAL_KEY_ID)
    assert first.startswith("whsec_")
    assert keys.webhook_secret(LOCAL_KEY_ID) == first
    # The local caller has no key to present.
    assert keys.authenticate(f"ie_{LOCAL_KEY_ID}_x") is None
