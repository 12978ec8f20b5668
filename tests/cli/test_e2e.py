"""The `instructedit` console script against the running stack (Redis, a Celery worker
with the tiny model, the API over HTTP), run as a subprocess as a shell user runs it."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from instructedit import Client
from instructedit.batch import STATE_NAME
from services.common.api_keys import KeyStore
from tests.cli import popen_cli, run_cli
from tests.conftest import image_bytes

pytestmark = pytest.mark.e2e


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(image_bytes((64, 48)))
    return path


def cli(stack, *args, key: str | None = None, **kwargs):
    return run_cli(*args, url=stack.base_url, key=key or stack.key.key, **kwargs)


def journal(outdir: Path) -> list[dict]:
    path = outdir / STATE_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by the kill
            records.append(json.loads(line))
    return records


def test_edit_writes_a_png_and_prints_its_path_and_seed(stack, photo, tmp_path):
    out = tmp_path / "out.png"
    result = cli(stack, "edit", photo, "make it red", "-o", out, "--steps", "2", "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(out), "seed: 7"]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 48)
    assert "Traceback" not in result.stderr


def test_edit_output_format_and_several_outputs(stack, photo, tmp_path):
    # --format webp into a directory: named after the photo.
    result = cli(
        stack, "edit", photo, "x", "-o", f"{tmp_path}/dir/", "--format", "webp", "--steps", "2"
    )
    assert result.returncode == 0, result.stderr
    (written,) = [Path(p) for p in result.stdout.splitlines() if not p.startswith("seed")]
    assert written.parent == tmp_path / "dir" and written.stem == "photo"
    with Image.open(written) as image:
        assert image.format == "WEBP"
    # The format from -o's extension; two outputs: out-0.jpg, out-1.jpg.
    out = tmp_path / "out.jpg"
    result = cli(
        stack, "edit", photo, "x", "-o", out, "--outputs", "2", "--steps", "2", "--seed", "5"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        str(tmp_path / "out-0.jpg"),
        str(tmp_path / "out-1.jpg"),
        "seed: 5",
    ]
    for path in (tmp_path / "out-0.jpg", tmp_path / "out-1.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"


def test_status_cancel_list_delete(stack, photo):
    client = Client(stack.base_url, stack.key.key)
    job = client.edit(photo, "make it slow", num_inference_steps=100, seed=1)
    result = cli(stack, "status", job.id)
    assert result.returncode == 0, result.stderr
    assert job.id in result.stdout and "make it slow" in result.stdout
    data = json.loads(cli(stack, "status", job.id, "--json").stdout)
    assert data["id"] == job.id and data["params"]["num_inference_steps"] == 100

    result = cli(stack, "cancel", job.id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [job.id, "canceled"]
    # Canceling a finished job again is fine; listing shows it among the canceled.
    listed = cli(stack, "list", "--status", "canceled", "--json")
    assert job.id in [json.loads(line)["id"] for line in listed.stdout.splitlines()]
    assert job.id in cli(stack, "list").stdout

    assert cli(stack, "delete", job.id).returncode == 0
    result = cli(stack, "status", job.id)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: job_not_found: ")
    assert "Traceback" not in result.stderr


def test_grid_composes_a_contact_sheet(stack, photo, tmp_path):
    out = tmp_path / "grid.png"
    result = cli(
        stack,
        "grid",
        photo,
        "make it red",
        "-o",
        out,
        "--image-guidance",
        "1,2",
        "--guidance",
        "5,7.5",
        "--seed",
        "3",
        "--steps",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(out), "seed: 3"]
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        # Bigger than the 2x2 cells alone: the axes and labels around them.
        assert sheet.width > 2 * 64 and sheet.height > 2 * 48
    jobs = [j for j in Client(stack.base_url, stack.key.key).list(limit=10)][:4]
    assert {(j.params["image_guidance_scale"], j.params["guidance_scale"]) for j in jobs} == {
        (1.0, 5.0),
        (1.0, 7.5),
        (2.0, 5.0),
        (2.0, 7.5),
    }
    assert {j.params["seed"] for j in jobs} == {3}


def test_a_file_that_is_not_an_image_is_exit_2(stack, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("not a picture at all\n")
    result = cli(stack, "edit", fake, "make it red", "-o", tmp_path / "o.png")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "image" in line
    assert "Traceback" not in result.stderr


def test_no_key_is_exit_1_unauthorized(stack, photo, tmp_path):
    result = run_cli("--url", stack.base_url, "edit", photo, "x", "-o", tmp_path / "o.png")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: unauthorized: ")
    result = run_cli("--url", stack.base_url, "--api-key", "wrong", "list")
    assert result.returncode == 1 and "unauthorized" in result.stderr


def test_ctrl_c_is_exit_130(stack, photo, tmp_path):
    process = popen_cli(
        "edit",
        photo,
        "slow",
        "-o",
        tmp_path / "o.png",
        "--steps",
        "100",
        url=stack.base_url,
        key=stack.key.key,
    )
    deadline = time.monotonic() + 30
    line = process.stderr.readline()  # "submitted <id>": it is waiting now
    assert line.startswith("submitted"), line
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=max(1, deadline - time.monotonic()))
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1].startswith("interrupted (job ")
    assert "Traceback" not in stderr
    Client(stack.base_url, stack.key.key).cancel(line.split()[1])


def _fresh_key(stack) -> str:
    return KeyStore(stack.redis).create("cli-batch").key


def _jobs_of(stack, key: str) -> list[dict]:
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}) as c:
        return c.get("/v1/edits", params={"limit": 100}).json()["data"]


@pytest.mark.parametrize(
    ("how", "exit_code"),
    [
        # kill -9: no chance to clean up; the journal is all there is.
        (signal.SIGKILL, -signal.SIGKILL),
        # Ctrl-C and SIGTERM: the journal is closed cleanly, running jobs are left to finish.
        (signal.SIGINT, 130),
        (signal.SIGTERM, 143),
    ],
    ids=["SIGKILL", "SIGINT", "SIGTERM"],
)
def test_a_batch_interrupted_halfway_and_resumed_does_every_item_once(
    stack,
    tmp_path,
    how,
    exit_code,
):
    key = _fresh_key(stack)
    photos = tmp_path / "catalog"
    photos.mkdir()
    for i in range(10):
        (photos / f"item{i:02d}.png").write_bytes(image_bytes((64, 48), color=(20 * i, 90, 40)))
    outdir = tmp_path / "edited"
    args = ("batch", photos, "make it red", "-o", outdir, "--concurrency", "2", "--steps", "30")

    process = popen_cli(*args, url=stack.base_url, key=key)
    deadline = time.monotonic() + 90
    while sum(r["type"] == "done" for r in journal(outdir)) < 5:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the batch did not get halfway"
        time.sleep(0.05)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == exit_code, stderr
    if how != signal.SIGKILL:
        assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    first = journal(outdir)
    done_first = {r["key"] for r in first if r["type"] == "done"}
    assert 5 <= len(done_first) < 10
    # Items submitted but not seen to finish: the resumed run must re-attach to their jobs.
    pending = {r["key"]: r["job_id"] for r in first if r["type"] == "submitted"}
    pending = {k: v for k, v in pending.items() if k not in done_first}
    lost = sorted(pending)[:1] if len(pending) > 1 else []
    if lost:
        # As if the crash came between the API accepting the job and the journal recording
        # it: the Idempotency-Key must still lead the resumed run to that same job.
        kept = [r for r in first if not (r["type"] == "submitted" and r["key"] in lost)]
        (outdir / STATE_NAME).write_text("".join(json.dumps(r) + "\n" for r in kept))

    result = run_cli(*args, url=stack.base_url, key=key, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"{len(done_first)} of 10 already done" in result.stderr

    records = journal(outdir)
    done = [r for r in records if r["type"] == "done"]
    assert sorted(r["key"] for r in done) == sorted(f"item{i:02d}.png" for i in range(10))
    for i in range(10):
        with Image.open(outdir / f"item{i:02d}.png") as image:
            assert image.format == "PNG"
    # Each item was submitted once: exactly ten jobs for the key, all succeeded, and the
    # journal's job ids are those ten.
    jobs = _jobs_of(stack, key)
    assert len(jobs) == 10
    assert all(j["status"] == "succeeded" for j in jobs)
    assert {j["id"] for j in jobs} == {r["job_id"] for r in done}
    done_job = {r["key"]: r["job_id"] for r in done}
    assert all(done_job[k] == job_id for k, job_id in pending.items())
    for k in set(pending) - set(lost):
        assert f"{k}: re-attached to job {pending[k]}" in result.stderr
    assert not [r for r in records if r["type"] == "failed"]

    # A third run has nothing left to do.
    again = run_cli(*args, url=stack.base_url, key=key)
    assert again.returncode == 0 and "10 of 10 already done" in again.stderr
    assert len(_jobs_of(stack, key)) == 10


def test_a_manifest_with_per_row_parameters(stack, tmp_path):
    key = _fresh_key(stack)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "shoe.png").write_bytes(image_bytes((64, 48)))
    (tmp_path / "bag.png").write_bytes(image_bytes((48, 64), color=(10, 10, 200)))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "instruction", "seed", "num_inference_steps", "output_format"])
    writer.writerow(["img/shoe.png", "", "11", "2", ""])
    writer.writerow(["bag.png", "make it green", "22", "3", "jpeg"])
    writer.writerow(["img/shoe.png", "", "33", "2", ""])  # the same image again: shoe-2
    writer.writerow(["missing.png", "", "44", "2", ""])
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(buf.getvalue())
    outdir = tmp_path / "out"

    result = run_cli("batch", manifest, "make it red", "-o", outdir, url=stack.base_url, key=key)
    assert result.returncode == 1, result.stderr  # the missing image failed
    assert "missing.png" in result.stdout and "Traceback" not in result.stderr
    assert (outdir / "shoe.png").exists() and (outdir / "shoe-2.png").exists()
    with Image.open(outdir / "bag.jpg") as image:
        assert image.format == "JPEG"
    jobs = {j["params"]["seed"]: j for j in _jobs_of(stack, key)}
    assert sorted(jobs) == [11, 22, 33]
    assert jobs[11]["params"]["prompt"] == "make it red"
    assert jobs[22]["params"]["prompt"] == "make it green"
    assert jobs[22]["params"]["num_inference_steps"] == 3
    done = {r["key"]: r for r in journal(outdir) if r["type"] == "done"}
    assert done["row:1:bag.png"]["seed"] == 22 and done["row:1:bag.png"]["outputs"] == ["bag.jpg"]


def test_datasets_create_status_cancel(stack):
    key = _fresh_key(stack)
    created = run_cli(
        "datasets",
        "create",
        "--rows",
        "2",
        "--seed",
        "1",
        "--pairs",
        "2",
        "--steps",
        "2",
        "--json",
        url=stack.base_url,
        key=key,
    )
    assert created.returncode == 0, created.stderr
    run = json.loads(created.stdout)
    assert run["spec"]["num_rows"] == 2 and run["spec"]["pairs_per_row"] == 2
    shown = run_cli("datasets", "status", run["id"], url=stack.base_url, key=key)
    assert shown.returncode == 0 and run["id"] in shown.stdout
    assert "progress.rows_total" in shown.stdout
    canceled = run_cli("datasets", "cancel", run["id"], "--json", url=stack.base_url, key=key)
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(canceled.stdout)["status"] in ("canceled", "canceling")
    missing = run_cli("datasets", "status", "nope", url=stack.base_url, key=key)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")


def test_datasets_create_from_your_own_captions(stack, tmp_path):
    key = _fresh_key(stack)
    captions = tmp_path / "captions.txt"
    captions.write_text('# my products\nblack hoodie\n{"caption": "a red leather handbag"}\n')
    created = run_cli(
        "datasets", "create", "--captions", str(captions), "--edits-per-caption", "2",
        "--pairs", "1", "--json", url=stack.base_url, key=key,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    run = json.loads(created.stdout)
    assert run["spec"]["rows_count"] == 4
    run_cli("datasets", "cancel", run["id"], url=stack.base_url, key=key)

    captions.write_text("black hoodie\na bottle of olive oil\n")
    refused = run_cli("datasets", "create", "--captions", str(captions), url=stack.base_url,
                      key=key)  # fmt: skip
    assert refused.returncode == 1
    first, detail = refused.stderr.splitlines()[:2]
    assert first.startswith("error: captions_unmapped: 1 of 2 captions")
    assert json.loads(detail)["index"] == 1
    both = run_cli("datasets", "create", "--rows", "2", "--captions", str(captions),
                   url=stack.base_url, key=key)  # fmt: skip
    assert both.returncode == 2 and "one of them" in both.stderr
