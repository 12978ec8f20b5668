"""The page end to end: a real browser, the real API over HTTP, a real worker (tiny model).

Each test drives the page as a person would (pick a file, type, click) and checks what it
shows against the API and the stored images.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from services.common.jobs import JobStore
from services.common.storage import FileStorage
from tests.conftest import image_bytes
from tests.ui.conftest import CHROMIUM, SCREENSHOTS

if not CHROMIUM.exists():
    pytest.skip("Chromium is not installed at /usr/bin/chromium", allow_module_level=True)

from playwright.sync_api import expect

pytestmark = pytest.mark.e2e

STEPS = 3


def photo(tmp_path: Path, size=(96, 72), name="photo.png") -> Path:
    path = tmp_path / name
    path.write_bytes(image_bytes(size, color=(40, 110, 190)))
    return path


def product_photo(tmp_path: Path, size=(160, 120)) -> Path:
    """Something like a product shot (a mug on a table), for the screenshots."""
    w, h = size
    image = Image.new("RGB", size, (236, 238, 242))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(h * 0.72), w, h), fill=(196, 170, 140))
    draw.ellipse((w * 0.28, h * 0.66, w * 0.72, h * 0.8), fill=(150, 128, 104))
    draw.ellipse((w * 0.58, h * 0.3, w * 0.78, h * 0.58), outline=(200, 60, 50), width=6)
    draw.rounded_rectangle((w * 0.3, h * 0.2, w * 0.64, h * 0.74), 8, fill=(214, 66, 52))
    path = tmp_path / "mug.png"
    image.save(path)
    return path


def tid(page, name: str):
    return page.get_by_test_id(name)


def loaded(locator) -> bool:
    """Whether an <img> finished loading a real image."""
    return locator.evaluate("img => img.complete && img.naturalWidth > 0")


def wait_loaded(locator) -> None:
    locator.page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=locator.element_handle()
    )


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def stored(stack, job_id: str):
    job = JobStore(stack.redis, 3600).get(job_id)
    storage = FileStorage(stack.settings["storage_url"].removeprefix("file://"))
    return job, storage


def screenshot(page, name: str) -> None:
    """The page as it stands, into SCREENSHOTS (palette PNG: a few hundred kB at most)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def fill_edit(page, prompt: str, steps: int = STEPS) -> None:
    tid(page, "prompt").fill(prompt)
    tid(page, "steps").fill(str(steps))


def test_root_redirects_to_the_page(stack, new_page):
    page = new_page(with_key=False)
    assert page.url == f"{stack.base_url}/ui"
    page.goto(stack.base_url + "/")
    assert page.url == f"{stack.base_url}/ui"
    expect(page).to_have_title("InstructEdit")


def test_edit_download_and_edit_again(stack, new_page, tmp_path):
    page = new_page(with_key=False)
    # Auth is on and no key is stored: GET /v1/edits answers 401, the page asks for one.
    expect(tid(page, "api-key")).to_be_visible()
    tid(page, "api-key").fill(stack.key.key)
    tid(page, "api-key-save").click()
    expect(tid(page, "api-key")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('instructedit.apiKey')") == stack.key.key

    tid(page, "image-input").set_input_files(str(product_photo(tmp_path)))
    wait_loaded(tid(page, "preview"))
    fill_edit(page, "make it look like a studio shot")
    # The sliders and their one-line meanings.
    expect(tid(page, "image-guidance")).to_have_value("1.5")
    expect(tid(page, "text-guidance")).to_have_value("7.5")
    expect(page.get_by_text("Keep the photo")).to_be_visible()
    expect(page.get_by_text("Follow the instruction")).to_be_visible()
    tid(page, "seed-random").uncheck()
    tid(page, "seed").fill("1234")
    tid(page, "submit").click()

    # Progress in steps, then the finished job.
    expect(tid(page, "progress")).to_contain_text(f"step {STEPS} / {STEPS}")
    expect(tid(page, "progress")).to_have_attribute("data-status", "succeeded")
    result = tid(page, "result-image")
    wait_loaded(result)
    wait_loaded(tid(page, "before-image"))
    assert loaded(result)
    first_url = result.get_attribute("src")
    first_id = first_url.split("/v1/edits/")[1].split("/")[0]
    expect(tid(page, "result-meta")).to_contain_text("seed 1234")
    screenshot(page, "ui-result.png")

    # Download: the output itself, as a PNG.
    with page.expect_download() as info:
        tid(page, "download").click()
    download = info.value
    assert download.suggested_filename == f"{first_id}-0.png"
    saved = tmp_path / "download.png"
    download.save_as(saved)
    data = saved.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    first_job, storage = stored(stack, first_id)
    assert data == storage.get(first_job.output_keys[0])

    # Edit again: the output is the next job's photo; the chain shows both edits.
    tid(page, "edit-again").click()
    expect(tid(page, "prompt")).to_have_value("")
    fill_edit(page, "add a soft shadow")
    tid(page, "submit").click()
    expect(tid(page, "progress")).to_have_attribute("data-status", "succeeded")
    expect(tid(page, "result-image")).not_to_have_attribute("src", first_url)
    wait_loaded(tid(page, "result-image"))
    steps = tid(page, "chain-step")
    expect(steps).to_have_count(2)
    expect(steps.nth(0)).to_contain_text("make it look like a studio shot")
    expect(steps.nth(1)).to_contain_text("add a soft shadow")
    expect(tid(page, "chain-origin")).to_have_count(1)

    second_id = tid(page, "result-image").get_attribute("src").split("/v1/edits/")[1][:32]
    second_id = second_id.split("/")[0]
    second_job, _ = stored(stack, second_id)
    assert second_job.params.prompt == "add a soft shadow"
    np.testing.assert_array_equal(
        pixels(storage.get(second_job.input_key)), pixels(storage.get(first_job.output_keys[0]))
    )

    # Both jobs are in the history, newest first, with thumbnails.
    items = tid(page, "history-item")
    expect(items.first).to_have_attribute("data-job-id", second_id)
    expect(page.locator(f"[data-job-id='{first_id}']")).to_have_count(1)
    wait_loaded(items.first.locator("img"))
    assert tid(page, "error").is_hidden()


def test_guidance_grid(stack, new_page, tmp_path):
    page = new_page()
    # Dropped rather than picked: the drop zone takes the file.
    data = list(product_photo(tmp_path).read_bytes())
    transfer = page.evaluate_handle(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
            return dt;
        }""",
        data,
    )
    tid(page, "drop").dispatch_event("drop", {"dataTransfer": transfer})
    wait_loaded(tid(page, "preview"))
    fill_edit(page, "turn it into a watercolor")
    tid(page, "grid-button").click()

    cells = tid(page, "grid-cell")
    expect(cells).to_have_count(9)
    for i in range(9):
        expect(cells.nth(i)).to_have_attribute("data-status", "succeeded", timeout=60_000)
        wait_loaded(cells.nth(i).locator("img"))
    scales = {
        (cell.get_attribute("data-image-guidance"), cell.get_attribute("data-text-guidance"))
        for cell in cells.all()
    }
    assert scales == {(si, st) for si in ("1", "1.5", "2") for st in ("5", "7.5", "10")}
    grid = tid(page, "grid")
    for label in ("S_T 5", "S_T 7.5", "S_T 10", "S_I 1.0", "S_I 1.5", "S_I 2.0"):
        expect(grid.get_by_text(label, exact=True)).to_be_visible()

    # The nine jobs: one seed, the nine scale pairs.
    with stack.client() as client:
        jobs = client.get("/v1/edits", params={"limit": 9}).json()["data"]
    assert len({job["params"]["seed"] for job in jobs}) == 1
    assert {
        (job["params"]["image_guidance_scale"], job["params"]["guidance_scale"]) for job in jobs
    } == {(si, st) for si in (1.0, 1.5, 2.0) for st in (5.0, 7.5, 10.0)}
    assert {job["params"]["num_inference_steps"] for job in jobs} == {STEPS}

    screenshot(page, "ui-grid.png")

    # A cell's scales go into the sliders.
    cell = page.locator("[data-testid=grid-cell][data-image-guidance='2'][data-text-guidance='5']")
    cell.click()
    expect(tid(page, "image-guidance")).to_have_value("2")
    expect(tid(page, "text-guidance")).to_have_value("5")
    expect(page.locator("#image-guidance-value")).to_have_text("2")
    wait_loaded(tid(page, "result-image"))
    expect(tid(page, "result-meta")).to_contain_text("S_I 2 · S_T 5")


def test_bad_file_shows_the_api_error(stack, new_page, tmp_path):
    page = new_page()
    bad = tmp_path / "notes.txt"
    bad.write_text("not a photo\n")
    tid(page, "image-input").set_input_files(str(bad))
    fill_edit(page, "make it blue")
    tid(page, "submit").click()
    error = tid(page, "error")
    expect(error).to_be_visible()
    expect(error).to_have_text("the uploaded file is not an image")
    expect(error).to_have_attribute("data-code", "not_an_image")

    # A parameter out of bounds: the API's own 422 message, naming the field.
    tid(page, "image-input").set_input_files(str(photo(tmp_path)))
    tid(page, "outputs").fill("9")
    tid(page, "submit").click()
    expect(error).to_contain_text("num_outputs")


def test_cancel_a_running_job(stack, new_page, tmp_path):
    page = new_page()
    # Large latents make each tiny-model step slow enough to cancel mid-run.
    tid(page, "image-input").set_input_files(str(photo(tmp_path, (256, 256))))
    fill_edit(page, "replace the background", steps=100)
    tid(page, "submit").click()
    progress = tid(page, "progress")
    expect(progress).to_have_attribute("data-status", "running")
    expect(progress).to_contain_text("/ 100")
    tid(page, "cancel").click()
    expect(progress).to_have_attribute("data-status", "canceled")
    expect(progress).to_contain_text("Canceled")
    expect(tid(page, "cancel")).to_be_hidden()
    job_id = progress.get_attribute("data-job-id")
    with stack.client() as client:
        job = client.get(f"/v1/edits/{job_id}").json()
    assert job["status"] == "canceled"
    assert job["progress"]["step"] < 100
    assert job["params"]["num_inference_steps"] == 100
    # The history shows it, canceled, without a thumbnail.
    item = page.locator(f"[data-testid=history-item][data-job-id='{job_id}']")
    expect(item).to_contain_text("canceled")
    expect(item.locator("img")).to_have_count(0)
    expect(tid(page, "submit")).to_be_enabled()


def test_progress_falls_back_to_polling(stack, new_page, tmp_path):
    page = new_page()
    # The event stream fails (a proxy that cuts it, say): the page polls the job instead.
    streams = []

    def refuse(route):
        streams.append(route.request.headers.get("authorization"))
        route.fulfill(status=502, body="bad gateway")

    page.route("**/v1/edits/*/events", refuse)
    tid(page, "image-input").set_input_files(str(photo(tmp_path)))
    mask = tmp_path / "mask.png"
    mask.write_bytes(image_bytes((96, 72), mode="L"))
    tid(page, "mask-input").set_input_files(str(mask))
    fill_edit(page, "make it green", steps=2)
    tid(page, "submit").click()
    expect(tid(page, "progress")).to_have_attribute("data-status", "succeeded")
    expect(tid(page, "progress")).to_contain_text("step 2 / 2")
    wait_loaded(tid(page, "result-image"))
    # The stream was asked for, with the key in the header (EventSource could not send it).
    assert streams == [f"Bearer {stack.key.key}"]
    assert tid(page, "error").is_hidden()
    # The mask went with it.
    with stack.client() as client:
        job = client.get(f"/v1/edits/{tid(page, 'progress').get_attribute('data-job-id')}")
    assert job.json()["mask"] is True
