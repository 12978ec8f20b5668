"""Jobs as the SDK hands them out: the API's job JSON, with methods that act on it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from httpx_sse import SSEError

from instructedit.errors import APIConnectionError, APIError, JobFailed

if TYPE_CHECKING:
    from instructedit.client import AsyncClient, Client

FINISHED = frozenset({"succeeded", "failed", "canceled"})
# The name of the event that ends a job's stream, per final status.
FINAL_EVENTS = frozenset({"completed", "failed", "canceled"})
# How often `wait()` polls when the event stream cannot be followed.
POLL_INTERVAL_S = 0.5
# Errors of the event stream after which `wait()` polls instead.
_STREAM_FAILURES = (APIError, APIConnectionError, SSEError, httpx.TransportError)


class _JobBase:
    """The state both job classes share: the fields of the API's job JSON."""

    id: str
    status: str
    params: dict[str, Any]
    progress_step: int
    progress_total: int
    outputs: list[str]
    error: dict[str, Any] | None
    queue_position: int | None
    estimated_wait_s: float | None
    raw: dict[str, Any]

    def __init__(self, raw: dict[str, Any]) -> None:
        self._update(raw)

    def _update(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.id = raw["id"]
        self.status = raw["status"]
        self.params = dict(raw.get("params") or {})
        progress = raw.get("progress") or {}
        self.progress_step = int(progress.get("step", 0))
        self.progress_total = int(progress.get("total", 0))
        self.outputs = [output["url"] for output in raw.get("outputs") or []]
        self.error = raw.get("error")
        self.queue_position = raw.get("queue_position")
        self.estimated_wait_s = raw.get("estimated_wait_s")

    @property
    def finished(self) -> bool:
        """Whether the job ended: succeeded, failed or canceled."""
        return self.status in FINISHED

    def raise_for_status(self):
        """Raise JobFailed if the job failed or was canceled; else return the job."""
        if self.status in ("failed", "canceled"):
            raise JobFailed(self)  # type: ignore[arg-type]
        return self

    def _state(self) -> tuple:
        return (self.status, self.progress_step, self.progress_total, self.queue_position)

    def _apply_event(self, event: dict[str, Any]) -> bool:
        """Take in one event of the job's stream; whether what `progress` reports changed."""
        before = self._state()
        name, data = event["event"], event["data"]
        if not isinstance(data, dict):
            return False
        raw = dict(self.raw)
        if name in FINAL_EVENTS and "id" in data:
            raw = data
        elif name == "status":
            raw["status"] = data.get("status", self.status)
            raw["progress"] = data.get("progress", raw.get("progress"))
            if raw["status"] != "queued":
                raw["queue_position"] = raw["estimated_wait_s"] = None
        elif name == "progress":
            raw["progress"] = {"step": data.get("step"), "total": data.get("total")}
        elif name == "queue_position":
            raw["queue_position"] = data.get("queue_position")
            raw["estimated_wait_s"] = data.get("estimated_wait_s")
        else:
            return False
        self._update(raw)
        return self._state() != before

    def __repr__(self) -> str:
        progress = f"{self.progress_step}/{self.progress_total}"
        return f"<{type(self).__name__} {self.id} {self.status} {progress}>"


class Job(_JobBase):
    """An edit job of a `Client`. Its attributes are the job as last read; `refresh()` and
    `wait()` update them in place."""

    def __init__(self, client: Client, raw: dict[str, Any]) -> None:
        self._client = client
        super().__init__(raw)

    def raise_for_status(self) -> Job:
        return super().raise_for_status()

    def refresh(self) -> Job:
        """Read the job again (GET), in place; returns the job."""
        self._update(self._client._get_raw(self.id))
        return self

    def cancel(self) -> Job:
        """Cancel the job (a queued one never runs, a running one stops at its next step);
        409 ConflictError if it already succeeded or failed."""
        self._update(self._client._cancel_raw(self.id))
        return self

    def download(self, directory: str | os.PathLike, stem: str | None = None) -> list[Path]:
        """Write the job's outputs into `directory`; see `Client.download`."""
        return self._client.download(self, directory, stem=stem)

    def wait(
        self,
        *,
        progress: Callable[[Job], None] | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Block until the job finished, following its event stream (polling GET every
        0.5 s if the stream cannot be followed). `progress(job)` is called on every change
        of status, step or queue position. Returns the finished job (failed and canceled
        too: see `raise_for_status()`); TimeoutError after `timeout` seconds."""
        if self.finished:
            return self
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for event in self._client._follow(self.id, deadline):
                if self._apply_event(event) and progress is not None:
                    progress(self)
                if self.finished:
                    return self
        except _STREAM_FAILURES:
            pass  # polled below
        return self._poll(progress, deadline)

    def _poll(self, progress: Callable[[Job], None] | None, deadline: float | None) -> Job:
        while True:
            before = self._state()
            self.refresh()
            if self._state() != before and progress is not None:
                progress(self)
            if self.finished:
                return self
            if deadline is not None and time.monotonic() + POLL_INTERVAL_S > deadline:
                raise TimeoutError(f"job {self.id} did not finish in time (it is {self.status})")
            time.sleep(POLL_INTERVAL_S)


class AsyncJob(_JobBase):
    """An edit job of an `AsyncClient`: `Job` with coroutine methods."""

    def __init__(self, client: AsyncClient, raw: dict[str, Any]) -> None:
        self._client = client
        super().__init__(raw)

    def raise_for_status(self) -> AsyncJob:
        return super().raise_for_status()

    async def refresh(self) -> AsyncJob:
        self._update(await self._client._get_raw(self.id))
        return self

    async def cancel(self) -> AsyncJob:
        self._update(await self._client._cancel_raw(self.id))
        return self

    async def download(self, directory: str | os.PathLike, stem: str | None = None) -> list[Path]:
        return await self._client.download(self, directory, stem=stem)

    async def wait(
        self,
        *,
        progress: Callable[[AsyncJob], Awaitable[None] | None] | None = None,
        timeout: float | None = None,
    ) -> AsyncJob:
        """As `Job.wait`; `progress` may be a plain function or a coroutine function."""
        if self.finished:
            return self
        try:
            async with asyncio.timeout(timeout):
                return await self._wait(progress)
        except TimeoutError:
            raise TimeoutError(
                f"job {self.id} did not finish in time (it is {self.status})"
            ) from None

    async def _wait(self, progress) -> AsyncJob:
        try:
            async for event in self._client.events(self.id):
                if self._apply_event(event):
                    await _call(progress, self)
                if self.finished:
                    return self
        except _STREAM_FAILURES:
            pass
        while True:
            before = self._state()
            await self.refresh()
            if self._state() != before:
                await _call(progress, self)
            if self.finished:
                return self
            await asyncio.sleep(POLL_INTERVAL_S)


async def _call(progress, job) -> None:
    if progress is not None:
        result = progress(job)
        if asyncio.iscoroutine(result):
            await result
