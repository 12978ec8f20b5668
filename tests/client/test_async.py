"""AsyncClient against the real stack."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from instructedit import AsyncClient, AsyncJob, NotFoundError
from tests.conftest import image_bytes

pytestmark = pytest.mark.e2e


def test_async_edit_wait_download(stack, tmp_path):
    async def scenario():
        seen: list[tuple[str, int]] = []

        async def progress(job: AsyncJob) -> None:
            seen.append((job.status, job.progress_step))

        async with AsyncClient(stack.base_url, stack.key.key) as client:
            job = await client.edit(
                image_bytes((64, 48)), "make it red", num_inference_steps=3, output_format="png"
            )
            assert isinstance(job, AsyncJob)
            await job.wait(progress=progress, timeout=60)
            paths = await job.download(tmp_path)
            again = await client.get(job.id)
            listed = [j.id async for j in client.list(limit=5)]
            events = [e["event"] async for e in client.events(job.id)]
            with pytest.raises(NotFoundError):
                await client.get("no-such-job")
        return job, seen, paths, again, listed, events

    job, seen, paths, again, listed, events = asyncio.run(scenario())
    assert job.status == "succeeded" and seen[-1] == ("succeeded", 3)
    assert [p.name for p in paths] == [f"{job.id}.png"]
    with Image.open(paths[0]) as image:
        assert image.format == "PNG" and image.size == (64, 48)
    assert again.id == job.id and again.status == "succeeded"
    assert job.id in listed
    assert events == ["completed"]


def test_async_wait_times_out(stack):
    async def scenario():
        async with AsyncClient(stack.base_url, stack.key.key) as client:
            job = await client.edit(image_bytes((256, 256)), "make it red", num_inference_steps=100)
            try:
                with pytest.raises(TimeoutError):
                    await job.wait(timeout=0.3)
            finally:
                await job.cancel()
            return job

    assert asyncio.run(scenario()).status == "canceled"
