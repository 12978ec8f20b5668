"""Both storage backends, the S3 one against moto's S3 server over real HTTP."""

import uuid

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from services.common.settings import Settings
from services.common.storage import (
    PROBE_PREFIX,
    FileStorage,
    ObjectNotFound,
    S3Storage,
    StorageError,
    check_writable,
    open_storage,
)
from tests.stack import free_port


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture
def s3_bucket(s3_endpoint, aws_env):
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        return FileStorage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Storage(bucket, "some/prefix", endpoint_url=endpoint)


def test_put_get_exists_delete_list(storage):
    storage.ping()
    storage.put("edits/a/input", b"one", "image/png")
    storage.put("edits/a/output_0.png", b"two", "image/png")
    storage.put("edits/b/input", b"three")
    assert storage.get("edits/a/input") == b"one"
    assert storage.exists("edits/a/output_0.png")
    assert storage.list("edits/a/") == ["edits/a/input", "edits/a/output_0.png"]
    storage.put("edits/a/input", b"replaced")
    assert storage.get("edits/a/input") == b"replaced"
    storage.delete("edits/a/input")
    assert not storage.exists("edits/a/input")
    with pytest.raises(ObjectNotFound):
        storage.get("edits/a/input")


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../b", "a//b", "a/./b"])
def test_keys_cannot_escape(storage, key):
    with pytest.raises(ValueError):
        storage.put(key, b"x")


def test_file_storage_has_no_presigned_url(tmp_path):
    assert FileStorage(tmp_path).presigned_url("edits/x/output_0.png", 60) is None


def test_s3_presigned_url_downloads_over_http(s3_bucket, s3_endpoint):
    store = S3Storage(s3_bucket, endpoint_url=s3_endpoint)
    store.put("edits/j/output_0.png", b"\x89PNG-bytes", "image/png")
    url = store.presigned_url("edits/j/output_0.png", 120)
    assert "X-Amz-Signature" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"\x89PNG-bytes"
    assert response.headers["content-type"] == "image/png"


def test_s3_presigned_url_uses_public_endpoint(s3_bucket, s3_endpoint):
    # In compose the API reaches MinIO as minio:9000; clients on the host need localhost.
    store = S3Storage(
        s3_bucket, endpoint_url=s3_endpoint, public_endpoint_url="http://localhost:9999"
    )
    url = store.presigned_url("edits/j/output_0.png", 120)
    assert url.startswith(f"http://localhost:9999/{s3_bucket}/edits/j/output_0.png?")


def test_s3_missing_bucket_fails_ping(s3_endpoint, aws_env):
    with pytest.raises(StorageError):
        S3Storage("no-such-bucket", endpoint_url=s3_endpoint).ping()


def test_open_storage_from_urls(tmp_path, s3_endpoint, s3_bucket):
    store = open_storage(Settings(storage_url=f"file://{tmp_path}/files"))
    assert isinstance(store, FileStorage) and store.root == tmp_path / "files"
    store = open_storage(
        Settings(storage_url=f"s3://{s3_bucket}/pre/fix", s3_endpoint_url=s3_endpoint)
    )
    store.put("k/v", b"1")
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert raw.get_object(Bucket=s3_bucket, Key="pre/fix/k/v")["Body"].read() == b"1"
    with pytest.raises(ValueError, match="unsupported storage URL"):
        open_storage(Settings(storage_url="ftp://x"))


def test_file_storage_failures_are_storage_errors(tmp_path):
    # The root is a file, as good as a disk that refuses writes: callers get StorageError
    # (they fail the job or answer 503), never a bare OSError.
    blocker = tmp_path / "store"
    blocker.write_bytes(b"not a directory")
    storage = FileStorage(blocker)
    with pytest.raises(StorageError, match="could not write"):
        storage.put("edits/a/output_0.png", b"png")
    with pytest.raises(StorageError, match="could not read"):
        storage.get("edits/a/input")
    with pytest.raises(ObjectNotFound):
        FileStorage(tmp_path / "empty").get("edits/a/input")


def test_s3_unreachable_endpoint_is_a_storage_error(aws_env):
    # Nothing listens on this port: a connection error, not an S3 answer.
    storage = S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    for call in (
        lambda: storage.get("edits/a/input"),
        lambda: storage.exists("edits/a/input"),
        lambda: storage.put("edits/a/input", b"x"),
        lambda: storage.list("edits/"),
    ):
        with pytest.raises(StorageError):
            call()


def test_check_writable_puts_and_deletes_a_probe(storage):
    check_writable(storage)
    assert storage.list("") == []  # the probe is gone again


def test_check_writable_fails_where_only_reads_work(tmp_path):
    storage = FileStorage(tmp_path / "store")
    storage.put("edits/a/input", b"png")
    # The probe's directory cannot be made (a file is in the way): reads still work,
    # and ping says so, but nothing can be written there.
    (tmp_path / "store" / PROBE_PREFIX.rstrip("/")).write_bytes(b"in the way")
    storage.ping()
    assert storage.get("edits/a/input") == b"png"
    with pytest.raises(StorageError, match="could not write"):
        check_writable(storage)
