"""`Client` and `AsyncClient`: the InstructEdit API over httpx.

Every request that is safe to send again (GET, DELETE, cancel, and a submission carrying
an ``Idempotency-Key``, which `edit()` always sends) is retried with tenacity on 429, 503
and network failures, waiting what ``Retry-After`` says (else exponential backoff with
jitter).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import EventSource
from tenacity import AsyncRetrying, Retrying

from instructedit import _http
from instructedit._http import Upload
from instructedit._params import edit_fields
from instructedit.errors import (
    APIConnectionError,
    APIError,
    ConflictError,
    connection_error,
    error_from_response,
)
from instructedit.jobs import FINAL_EVENTS, AsyncJob, Job

_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


def _where(url: str | httpx.URL, base_url: str) -> str:
    """The URL an error names: the API's, or the origin of another host's (an S3 link,
    whose query string is a credential)."""
    if _http.origin(url) == _http.origin(base_url):
        return base_url
    scheme, host, port = _http.origin(url)
    return f"{scheme}://{host}" + (f":{port}" if port else "")


class _Base:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        max_retries: int,
    ) -> None:
        self.base_url = _http.resolve_base_url(base_url)
        self.api_key = _http.resolve_api_key(api_key)
        self.timeout = timeout
        self.max_retries = max_retries
        self._auth = _http.KeyAuth(self.api_key, self.base_url)
        self._headers = {"User-Agent": _http.user_agent()}

    def _retry_options(self, method: str, headers: dict[str, str] | None, idempotent: bool | None):
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS or "Idempotency-Key" in (headers or {})
        return _http.retry_options(self.max_retries, idempotent)

    def _submission(
        self,
        image: Upload,
        prompt: str,
        mask: Upload | None,
        webhook_url: str | None,
        webhook_events: Sequence[str] | None,
        idempotency_key: str | None,
        wait: float | None,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        """The keyword arguments of the submit request, checked before anything is sent."""
        fields = edit_fields(prompt, params, webhook_url, webhook_events)
        _http.check_wait(wait)
        files = {"image": _http.upload(image, "image")}
        if mask is not None:
            files["mask"] = _http.upload(mask, "mask")
        return {
            "data": fields,
            "files": files,
            "params": {"wait": wait} if wait is not None else None,
            "headers": {"Idempotency-Key": idempotency_key or str(uuid.uuid4())},
            # A held submit answers after up to `wait` seconds.
            "timeout": _http.timeout_for(self.timeout, None if wait is None else wait + 15),
        }

    @staticmethod
    def _not_succeeded(job) -> ConflictError:
        return ConflictError(
            409, "job_not_succeeded", f"job {job.id} is {job.status}; it has no outputs"
        )

    @staticmethod
    def _output_file(job, directory, stem, index: int, response: httpx.Response) -> Path:
        ext = _http.extension(response.headers.get("content-type"), job.params.get("output_format"))
        path = _http.output_path(Path(directory), stem or job.id, index, len(job.outputs), ext)
        _http.write_file(path, response.content)
        return path

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.base_url}>"


# -- sync ----------------------------------------------------------------------------------


class Client(_Base):
    """The InstructEdit API.

    `base_url` defaults to ``$INSTRUCTEDIT_URL``, else http://127.0.0.1:8000; `api_key` to
    ``$INSTRUCTEDIT_API_KEY`` (without one, no key is sent). `timeout` bounds each request
    (connect, each read), `max_retries` the retries of a request that is safe to repeat.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = httpx.Client(
            base_url=self.base_url,
            auth=self._auth,
            headers=self._headers,
            timeout=timeout,
            transport=transport,
        )
        self.datasets = Datasets(self)

    # -- plumbing

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """One attempt: the response, or the typed error for an error status."""
        try:
            response = self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise connection_error(exc, _where(request.url, self.base_url)) from exc
        if response.status_code >= 400:
            response.read()
            response.close()
            raise error_from_response(response)
        return response

    def _request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """The request, retried (when safe) on 429, 503 and network failures."""
        request = self._http.build_request(method, url, **kwargs)
        retrying = Retrying(**self._retry_options(method, kwargs.get("headers"), idempotent))
        return retrying(self._send, request, stream=stream)

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._request(method, url, **kwargs).json()

    def _get_raw(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/edits/{job_id}")

    def _cancel_raw(self, job_id: str) -> dict[str, Any]:
        # Canceling twice answers the canceled job: safe to retry.
        return self._json("POST", f"/v1/edits/{job_id}/cancel", idempotent=True)

    # -- edits

    def edit(
        self,
        image: Upload,
        prompt: str,
        *,
        mask: Upload | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **params: Any,
    ) -> Job:
        """Submit an edit of `image` (a path, bytes or a binary file) by `prompt`.

        `params` are any of the API's edit parameters (num_inference_steps, seed,
        output_format, ...), checked here as the API checks them: an unknown name raises
        TypeError, a value out of bounds InvalidRequestError (``invalid_<field>``), before
        anything is sent. Only the parameters given are sent (the server draws the seed).
        With `wait` (seconds, at most 60) the API holds the request until the job finished
        or the time is up. The submission carries an Idempotency-Key (`idempotency_key`,
        or a new one), so retrying it never makes a second job.
        """
        request = self._submission(
            image, prompt, mask, webhook_url, webhook_events, idempotency_key, wait, params
        )
        return Job(self, self._json("POST", "/v1/edits", **request))

    def get(self, job_id: str) -> Job:
        return Job(self, self._get_raw(job_id))

    def cancel(self, job_id: str) -> Job:
        return Job(self, self._cancel_raw(job_id))

    def delete(self, job_id: str) -> None:
        """Delete the job with its images (a job still running is canceled first)."""
        self._request("DELETE", f"/v1/edits/{job_id}")

    def list(self, *, status: str | None = None, limit: int = 20) -> Iterator[Job]:
        """The key's jobs, newest first, optionally only those in `status`: fetched `limit`
        a page, lazily, following the cursor to the last page."""
        cursor = None
        while True:
            page = self._json("GET", "/v1/edits", params=_http.page_params(status, limit, cursor))
            for raw in page["data"]:
                yield Job(self, raw)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's server-sent events, each ``{"event", "id", "data"}`` (data parsed):
        ``status``, ``progress``, ``queue_position``, then ``completed``, ``failed`` or
        ``canceled`` with the finished job, after which the iterator ends. A dropped
        stream is resumed where it was (``Last-Event-ID``)."""
        return self._follow(job_id, None)

    def _follow(self, job_id: str, deadline: float | None) -> Iterator[dict[str, Any]]:
        last_id: str | None = None
        drops = 0
        while True:
            read = max(self.timeout, _http.STREAM_READ_TIMEOUT_S)
            if deadline is not None:
                read = deadline - time.monotonic()
                if read <= 0:
                    raise TimeoutError(f"job {job_id} did not finish in time")
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            response = self._request(
                "GET",
                f"/v1/edits/{job_id}/events",
                headers=headers,
                timeout=httpx.Timeout(self.timeout, read=read),
                stream=True,
            )
            try:
                if response.status_code == 204:  # it ended, and we saw the end
                    return
                for sse in EventSource(response).iter_sse():
                    drops = 0
                    last_id = sse.id or last_id
                    yield _http.sse_dict(sse)
                    if sse.event in FINAL_EVENTS:
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"job {job_id} did not finish in time")
                failure: APIConnectionError | None = None  # ended early: resume
            except httpx.TimeoutException as exc:
                if deadline is not None and time.monotonic() >= deadline - 0.01:
                    raise TimeoutError(f"job {job_id} did not finish in time") from None
                failure = connection_error(exc, self.base_url)
            except httpx.TransportError as exc:
                failure = connection_error(exc, self.base_url)
            finally:
                response.close()
            drops += 1
            if drops > self.max_retries:
                raise failure or APIConnectionError(
                    f"the event stream of job {job_id} ended before the job did", url=self.base_url
                )
            time.sleep(min(_http.BACKOFF_INITIAL_S * 2 ** (drops - 1), 5.0))

    def download(
        self, job: Job | str, directory: str | os.PathLike, *, stem: str | None = None
    ) -> list[Path]:
        """Write a succeeded job's outputs into `directory` (made if missing): one output
        as ``<stem>.<ext>``, several as ``<stem>-<index>.<ext>``; `stem` defaults to the
        job's id, the extension follows the image format. Returns the paths, in order.
        Output URLs are fetched as given (a presigned S3 link gets no API key); an expired
        one is renewed by reading the job again."""
        if isinstance(job, str):
            job = self.get(job)
        if job.status != "succeeded":
            job.refresh()
        if job.status != "succeeded":
            raise self._not_succeeded(job)
        Path(directory).mkdir(parents=True, exist_ok=True)
        paths = []
        for index in range(len(job.outputs)):
            try:
                response = self._request("GET", job.outputs[index])
            except APIError as exc:
                if exc.status_code not in (401, 403):
                    raise
                response = self._request("GET", job.refresh().outputs[index])
            paths.append(self._output_file(job, directory, stem, index, response))
        return paths

    # -- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Datasets:
    """`client.datasets`: dataset runs on the datagen workers."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, **spec: Any) -> dict[str, Any]:
        """Start (or resume) a run of `spec` (the API's DatasetSpec: ``num_rows`` and
        ``seed``, or ``rows``, or your own ``captions``; ``pairs_per_row``, ``filter``, ...).
        Returns the run."""
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        return self._client._json("POST", "/v1/datasets", json=spec, headers=headers)

    def get(self, run_id: str) -> dict[str, Any]:
        return self._client._json("GET", f"/v1/datasets/{run_id}")

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._client._json("POST", f"/v1/datasets/{run_id}/cancel", idempotent=True)

    def list(self, status: str | None = None, limit: int = 20) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            params = _http.page_params(status, limit, cursor)
            page = self._client._json("GET", "/v1/datasets", params=params)
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return


# -- async ---------------------------------------------------------------------------------


class AsyncClient(_Base):
    """`Client` for asyncio: the same methods, as coroutines (`list`, `events` and
    `datasets.list` are async iterators)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            auth=self._auth,
            headers=self._headers,
            timeout=timeout,
            transport=transport,
        )
        self.datasets = AsyncDatasets(self)

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise connection_error(exc, _where(request.url, self.base_url)) from exc
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise error_from_response(response)
        return response

    async def _request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        request = self._http.build_request(method, url, **kwargs)
        retrying = AsyncRetrying(**self._retry_options(method, kwargs.get("headers"), idempotent))
        return await retrying(self._send, request, stream=stream)

    async def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return (await self._request(method, url, **kwargs)).json()

    async def _get_raw(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/edits/{job_id}")

    async def _cancel_raw(self, job_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/v1/edits/{job_id}/cancel", idempotent=True)

    async def edit(
        self,
        image: Upload,
        prompt: str,
        *,
        mask: Upload | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **params: Any,
    ) -> AsyncJob:
        """See `Client.edit`."""
        request = self._submission(
            image, prompt, mask, webhook_url, webhook_events, idempotency_key, wait, params
        )
        return AsyncJob(self, await self._json("POST", "/v1/edits", **request))

    async def get(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._get_raw(job_id))

    async def cancel(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._cancel_raw(job_id))

    async def delete(self, job_id: str) -> None:
        await self._request("DELETE", f"/v1/edits/{job_id}")

    async def list(self, *, status: str | None = None, limit: int = 20) -> AsyncIterator[AsyncJob]:
        cursor = None
        while True:
            params = _http.page_params(status, limit, cursor)
            page = await self._json("GET", "/v1/edits", params=params)
            for raw in page["data"]:
                yield AsyncJob(self, raw)
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """See `Client.events`."""
        last_id: str | None = None
        drops = 0
        read = max(self.timeout, _http.STREAM_READ_TIMEOUT_S)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            response = await self._request(
                "GET",
                f"/v1/edits/{job_id}/events",
                headers=headers,
                timeout=httpx.Timeout(self.timeout, read=read),
                stream=True,
            )
            try:
                if response.status_code == 204:
                    return
                async for sse in EventSource(response).aiter_sse():
                    drops = 0
                    last_id = sse.id or last_id
                    yield _http.sse_dict(sse)
                    if sse.event in FINAL_EVENTS:
                        return
                failure: APIConnectionError | None = None
            except httpx.TransportError as exc:
                failure = connection_error(exc, self.base_url)
            finally:
                await response.aclose()
            drops += 1
            if drops > self.max_retries:
                raise failure or APIConnectionError(
                    f"the event stream of job {job_id} ended before the job did", url=self.base_url
                )
            await asyncio.sleep(min(_http.BACKOFF_INITIAL_S * 2 ** (drops - 1), 5.0))

    async def download(
        self, job: AsyncJob | str, directory: str | os.PathLike, *, stem: str | None = None
    ) -> list[Path]:
        """See `Client.download`."""
        if isinstance(job, str):
            job = await self.get(job)
        if job.status != "succeeded":
            await job.refresh()
        if job.status != "succeeded":
            raise self._not_succeeded(job)
        Path(directory).mkdir(parents=True, exist_ok=True)
        paths = []
        for index in range(len(job.outputs)):
            try:
                response = await self._request("GET", job.outputs[index])
            except APIError as exc:
                if exc.status_code not in (401, 403):
                    raise
                response = await self._request("GET", (await job.refresh()).outputs[index])
            paths.append(self._output_file(job, directory, stem, index, response))
        return paths

    async def aclose(self) -> None:
        await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncDatasets:
    """`async_client.datasets`: see `Datasets`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, **spec: Any) -> dict[str, Any]:
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        return await self._client._json("POST", "/v1/datasets", json=spec, headers=headers)

    async def get(self, run_id: str) -> dict[str, Any]:
        return await self._client._json("GET", f"/v1/datasets/{run_id}")

    async def cancel(self, run_id: str) -> dict[str, Any]:
        return await self._client._json("POST", f"/v1/datasets/{run_id}/cancel", idempotent=True)

    async def list(
        self, status: str | None = None, limit: int = 20
    ) -> AsyncIterator[dict[str, Any]]:
        cursor = None
        while True:
            params = _http.page_params(status, limit, cursor)
            page = await self._client._json("GET", "/v1/datasets", params=params)
            for run in page["data"]:
                yield run
            cursor = page.get("next_cursor")
            if not cursor:
                return
