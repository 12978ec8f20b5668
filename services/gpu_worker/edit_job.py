"""Edit jobs from record to result: claim, gather a batch, run the engine, store outputs.

Every way a job can end is decided here, so that no job is ever left `running`.

A queue message names one job. The worker claims it, then also claims up to
`max_batch - 1` other queued jobs with the same batch key (from the pending index the API
keeps) and runs them together. Their own messages arrive later and find nothing to do.

A claim is a lease with an owner token, kept alive while the worker holds the job by the
progress publisher (progress.py), a background thread that also publishes the jobs'
progress and learns of cancels, so that the denoising loop never waits on Redis. If the
worker dies, the lease lapses and whichever message comes next for the job (redelivered,
deferred until then, or sent again by the reaper) runs it again. Every later change the
worker makes checks the token, so a worker that lost its claim can neither move the job
nor publish outputs; outputs are written under the claim's own keys, so it never
overwrites those of the worker that took over.

The GPU is kept busy: the inputs of a batch are read and decoded on a thread pool, all at
once; the outputs of every job are made, encoded and stored on that pool while the next
batch already denoises; and halfway through a batch the inputs of the next one (the
oldest pending jobs of any batch key) are read and decoded ahead, without claiming them,
so that an idle worker elsewhere can still take them. When the batch is done they are
claimed and run in the same task, up to `prefetch_batches` more batches a task.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import redis
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from services.common.adapters import AdapterStore
from services.common.edit_params import EditParams, OutputSize, batch_key
from services.common.images import (
    OUTPUT_FORMATS,
    ImageRejected,
    decode_image,
    encode_output,
    prepare_input,
    prepare_mask,
)
from services.common.jobs import (
    EditJob,
    JobError,
    JobErrorCode,
    JobNotFound,
    JobStatus,
    JobStore,
    TransitionRefused,
    output_key,
    utcnow,
)
from services.common.logging import bind_request_id
from services.common.storage import ObjectNotFound, Storage, StorageError
from services.common.webhooks import WebhookEvent
from services.gpu_worker.adapters import AdapterResolver
from services.gpu_worker.engine import (
    AdapterUnavailable,
    EditEngine,
    EditRequest,
    is_out_of_memory,
)
from services.gpu_worker.full_resolution import OutputShaper
from services.gpu_worker.progress import (
    PROGRESS_INTERVAL_S,
    ClaimLost,
    JobCanceled,
    ProgressPublisher,
)

__all__ = [
    "ClaimLost",
    "Deferred",
    "EditRunner",
    "HeldJobs",
    "JobCanceled",
    "JobFailure",
    "lapse_lease",
]

log = logging.getLogger(__name__)


class JobFailure(Exception):
    """The job cannot run, for a reason the client is told in its `error`."""

    def __init__(self, code: JobErrorCode, detail: str | None = None) -> None:
        self.error = JobError.of(code, detail)
        super().__init__(self.error.message)


@dataclass(frozen=True)
class Deferred:
    """The job is held by another live worker; look again after `seconds`."""

    seconds: float


@dataclass
class _Inputs:
    """A job's images, read and decoded (which needs no claim)."""

    # The upright sRGB input at its own size and the job's mask at that size: what the
    # outputs are made at full resolution from, and what a mask keeps exactly.
    original: Image.Image
    mask: Image.Image | None
    # What the model gets: both at the job's resolution bucket.
    model_input: Image.Image
    model_mask: Image.Image | None


@dataclass
class _Loaded:
    job: EditJob
    request: EditRequest
    original: Image.Image
    mask: Image.Image | None


@dataclass
class _Prefetch:
    """The next batch's inputs, read ahead while the current batch denoises."""

    go: threading.Event = field(default_factory=threading.Event)  # set halfway through
    abandoned: bool = False
    future: Future | None = None


# Unclaimed jobs whose inputs were read ahead, with their images.
Prefetched = list[tuple[EditJob, _Inputs]]
# Queue a job's webhook event (job, event, what makes it unique: a step, a claim).
Notify = Callable[[EditJob, WebhookEvent, str], None]


class HeldJobs:
    """The jobs one worker process holds, in Redis: a hash of job id -> claim owner token.

    A pool child that dies (SIGKILL, the kernel's OOM killer) renews its leases no more,
    and its jobs would wait a whole lease before anyone may take them over. Its parent,
    which sees it die at once, reads this record and lets those leases lapse
    (`lapse_lease`), so that they run again right away. Kept up as jobs are claimed and
    cleared when the task that claimed them ends; it expires on its own after `ttl_s`.
    """

    def __init__(self, client: redis.Redis, key: str, ttl_s: int) -> None:
        self.redis = client
        self.key = key
        self.ttl_s = ttl_s

    def add(self, job: EditJob) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.key, job.id, job.lease_owner or "")
            pipe.expire(self.key, self.ttl_s)
            pipe.execute()

    def remove(self, *job_ids: str) -> None:
        if job_ids:
            self.redis.hdel(self.key, *job_ids)

    def held(self) -> dict[str, str]:
        """Job id -> owner token of every job recorded as held."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key).items()}

    def clear(self) -> None:
        self.redis.delete(self.key)


def lapse_lease(jobs: JobStore, job_id: str, owner: str) -> bool:
    """End the lease of the claim `owner` holds on `job_id` now (its worker is known to be
    dead), so that the job may be taken over at once. False where that claim no longer
    holds (the job finished, was canceled or was taken over meanwhile).

    Uses JobStore.expire_lease(job_id, owner) where JobStore has it; otherwise the claim's
    own lease renewal, to a lease that ends now: the lifecycle's renew_lease guard
    (holds_claim) makes it apply only while that very claim holds, compare-and-set.
    """
    expire = getattr(jobs, "expire_lease", None)
    try:
        if expire is not None:
            expire(job_id, owner)
            return True
        job = jobs.get(job_id)
        if job.status != JobStatus.running or job.lease_owner != owner:
            return False
        jobs.renew_lease(job, timedelta(0))
        return True
    except (TransitionRefused, JobNotFound):
        return False


class EditRunner:
    def __init__(
        self,
        engine: EditEngine | None,
        jobs: JobStore,
        storage: Storage,
        max_batch: int = 1,
        batch_window_ms: int = 0,
        lease_s: float = 60.0,
        engine_error: str | None = None,
        observer=None,
        io_threads: int = 4,
        prefetch_batches: int = 0,
        max_task_s: float | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        held: HeldJobs | None = None,
        notify: Notify | None = None,
    ) -> None:
        self.engine = engine
        # Queues the jobs' webhook deliveries (services/common/webhook_notify.py).
        self.notify: Notify = notify or (lambda job, event, detail="": None)
        # Where this process records the jobs it holds, for its parent to release them at
        # once if it dies (None: nowhere; they wait for their leases to lapse).
        self.held = held
        self._held_ids: set[str] = set()
        self.jobs = jobs
        self.storage = storage
        self.max_batch = max_batch
        self.batch_window_s = batch_window_ms / 1000
        self.lease = timedelta(seconds=lease_s)
        self.engine_error = engine_error
        self.observer = observer
        # Batches a task runs after the one its message started (0: none), as long as
        # twice its longest batch still fits in `max_task_s` (the task's time limit).
        self.prefetch_batches = prefetch_batches
        self.max_task_s = max_task_s
        self.progress_interval_s = progress_interval_s
        # Reading, decoding, making and encoding images, storing them: Pillow, zlib, the
        # storage clients and torch release the GIL for most of it.
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="edit-io")
        # One per job being finished, waiting for its outputs on the pool above (a job
        # is recorded once all its outputs are stored): never blocks the pool itself.
        self._finishers = ThreadPoolExecutor(max(max_batch, 2), thread_name_prefix="edit-finish")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="edit-prefetch")
        self._publisher: ProgressPublisher | None = None
        self._prefetch: _Prefetch | None = None
        # Jobs' adapters are looked up in the adapter store of the jobs' Redis, and
        # `storage:` ones downloaded from the jobs' storage.
        client = getattr(jobs, "redis", None)
        if engine is not None and client is not None:
            engine.set_adapter_resolver(AdapterResolver(AdapterStore(client, storage), storage))

    # -- entry point -------------------------------------------------------------------

    def handle(self, job_id: str) -> dict[str, JobStatus | None] | Deferred | None:
        """Run the job named by a queue message, with whatever can join it.

        Returns each run job's final status, Deferred when another live worker holds the
        job, or None when there is nothing to do (finished, canceled or expired).
        """
        try:
            job = self._claim(job_id)
        except JobNotFound:
            log.warning("job %s has no record (expired or never created); dropping it", job_id)
            return None
        except TransitionRefused as refused:
            held = refused.job
            if held.status == JobStatus.running and held.lease_expires_at:
                wait = (held.lease_expires_at - utcnow()).total_seconds()
                return Deferred(max(wait, 0.0) + 0.5)
            log.info("job %s is %s; not running it", job_id, held.status)
            return None
        try:
            with bind_request_id(job.request_id, job.id), self._holding() as publisher:
                publisher.hold(job)
                batch = [job, *self._gather(job)]
                return self._run_batches(batch, prefetch=True)
        finally:
            self._forget_held()

    def run(self, batch: list[EditJob]) -> dict[str, JobStatus | None]:
        """Run claimed jobs; every one of them ends here, whatever goes wrong."""
        try:
            with self._holding() as publisher:
                for job in batch:
                    publisher.hold(job)
                    self._record_held(job)
                return self._run_batches(batch, prefetch=False)
        finally:
            self._forget_held()

    def _record_held(self, job: EditJob) -> None:
        if self.held is None:
            return
        self._held_ids.add(job.id)
        try:
            self.held.add(job)
        except redis.RedisError as exc:  # only a faster takeover is lost
            log.warning("could not record holding job %s: %s", job.id, exc)

    def _forget_held(self) -> None:
        """The task is over: every job it claimed has ended, or is another's."""
        if self.held is None or not self._held_ids:
            return
        ids, self._held_ids = self._held_ids, set()
        try:
            self.held.remove(*ids)
        except redis.RedisError as exc:
            log.warning("could not clear the record of held jobs: %s", exc)

    @contextlib.contextmanager
    def _holding(self) -> Iterator[ProgressPublisher]:
        """The publisher of the held jobs' progress, leases and cancels, for this task."""
        if self._publisher is not None:
            yield self._publisher
            return
        with ProgressPublisher(self.jobs, self.lease, self.progress_interval_s) as publisher:
            self._publisher = publisher
            try:
                yield publisher
            finally:
                self._publisher = None

    # -- claiming ----------------------------------------------------------------------

    def _claim(self, job_id: str, queued_only: bool = False) -> EditJob:
        claim = self.jobs.claim(job_id, self.lease, queued_only=queued_only)
        self._record_held(claim.job)
        if self._publisher is not None:
            self._publisher.hold(claim.job)
        if self.observer and not claim.took_over:
            self.observer.job_started(claim.job)
        self.notify(claim.job, WebhookEvent.start, claim.job.lease_owner or "")
        return claim.job

    def _gather(self, first: EditJob) -> list[EditJob]:
        """Claim up to max_batch - 1 queued jobs sharing `first`'s batch key."""
        if self.max_batch <= 1 or not first.batch_key:
            return []
        joined: list[EditJob] = []
        deadline = time.monotonic() + self.batch_window_s
        while True:
            for job_id in self.jobs.pending(first.batch_key, 4 * self.max_batch):
                if len(joined) >= self.max_batch - 1:
                    break
                try:
                    joined.append(self._claim(job_id, queued_only=True))
                except (TransitionRefused, JobNotFound):
                    # Not claimable (the claim itself takes a job off the index).
                    self.jobs.remove_pending(first.batch_key, job_id)
            if len(joined) >= self.max_batch - 1 or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if joined:
            log.info("job %s runs in a batch with %s", first.id, [j.id for j in joined])
        return joined

    # -- running -----------------------------------------------------------------------

    def _run_batches(self, batch: list[EditJob], prefetch: bool) -> dict[str, JobStatus | None]:
        """Run `batch`, then (with `prefetch`) the batches read ahead while it ran. Every
        job claimed here ends here, whatever goes wrong."""
        results: dict[str, JobStatus | None] = {}
        claimed = list(batch)
        finishing: list[tuple[EditJob, Future]] = []
        started = time.monotonic()
        longest = 0.0
        try:
            loaded = self._load_all(batch, results)
            for extra in range(self.prefetch_batches + 1 if prefetch else 1):
                round_started = time.monotonic()
                ahead = (
                    self._start_prefetch() if extra < self.prefetch_batches and prefetch else None
                )
                try:
                    self._run_loaded(loaded, results, finishing)
                finally:
                    upcoming = self._end_prefetch(ahead)
                longest = max(longest, time.monotonic() - round_started)
                if not upcoming:
                    break
                elapsed = time.monotonic() - started
                if self.max_task_s is not None and elapsed + 2 * longest > self.max_task_s:
                    log.info("not running more batches in this task: its time limit is near")
                    break
                loaded = self._claim_prefetched(upcoming, claimed)
                if not loaded:
                    break
            self._wait_finishing(finishing, results)
        except Exception as exc:
            # Anything unforeseen (a bug, a time limit outside the engine): fail what is
            # still running rather than leave it `running` until its lease lapses.
            if isinstance(exc, SoftTimeLimitExceeded):
                error = JobError.of(JobErrorCode.timeout)
            else:
                log.exception("running batch %s failed", [job.id for job in claimed])
                error = _internal_error(exc)
            # Outputs being stored meanwhile land first (or fail) and record their job.
            with contextlib.suppress(Exception):
                self._wait_finishing(finishing, results)
            for job in claimed:
                if job.id not in results:
                    results[job.id] = self._fail(job, error)
        return results

    def _run_loaded(
        self,
        loaded: list[_Loaded],
        results: dict[str, JobStatus | None],
        finishing: list[tuple[EditJob, Future]],
    ) -> None:
        groups: dict[str, list[_Loaded]] = {}
        for item in loaded:
            key = batch_key(item.request.image.size, item.job.params)
            groups.setdefault(key, []).append(item)
        # Jobs normally share one key; a worker serving another resolution budget than
        # the API keys by sees other buckets, so group by what the engine really gets.
        for group in groups.values():
            self._run_group(group, results, finishing)

    def _load_all(self, batch: list[EditJob], results: dict[str, JobStatus | None]):
        """The batch's inputs, read and decoded all at once; a job whose inputs are
        unusable fails alone."""
        futures = [(job, self._io.submit(self._load_inputs, job)) for job in batch]
        loaded: list[_Loaded] = []
        for job, future in futures:
            try:
                inputs = future.result()
            except JobFailure as failure:
                results[job.id] = self._fail(job, failure.error)
                continue
            loaded.append(self._loaded(job, inputs))
        return loaded

    def _load(self, job: EditJob) -> _Loaded:
        return self._loaded(job, self._load_inputs(job))

    def _load_inputs(self, job: EditJob) -> _Inputs:
        if self.engine is None:
            raise JobFailure(JobErrorCode.model_unavailable, self.engine_error)
        with bind_request_id(job.request_id, job.id):
            raw = self._read(job.input_key, "the input image")
            try:
                original = prepare_input(decode_image(raw).image)
                mask = None
                if job.mask_key:
                    mask_data = self._read(job.mask_key, "the mask")
                    mask = prepare_mask(mask_data, original.size, job.params.mask_invert)
            except ImageRejected as exc:
                raise JobFailure(JobErrorCode.input_invalid, exc.message) from None
            bucket = self.engine.bucket_for(*original.size)
            model_input = _resized(original, bucket, Image.Resampling.LANCZOS)
            model_mask = None if mask is None else _resized(mask, bucket, Image.Resampling.BILINEAR)
            return _Inputs(original, mask, model_input, model_mask)

    def _loaded(self, job: EditJob, inputs: _Inputs) -> _Loaded:
        on_step = self._step_callback(job) if self._publisher is not None else None
        request = EditRequest(inputs.model_input, job.params, on_step, inputs.model_mask)
        return _Loaded(job, request, inputs.original, inputs.mask)

    def _read(self, key: str, what: str) -> bytes:
        try:
            return self.storage.get(key)
        except ObjectNotFound:
            raise JobFailure(JobErrorCode.input_missing, key) from None
        except StorageError as exc:
            # The storage's own words (paths, hosts, buckets) stay in the log.
            log.warning("could not read %s (%s): %s", what, key, exc)
            raise JobFailure(JobErrorCode.storage_error, f"could not read {what}") from None

    def _step_callback(self, job: EditJob):
        """The job's `on_step`: no Redis (the publisher's in-memory progress and flags);
        halfway through, it starts reading the next batch's inputs."""
        report = self._publisher.on_step(job.id)

        def on_step(step: int, total: int) -> None:
            report(step, total)  # raises JobCanceled or ClaimLost: the job leaves the batch
            if job.webhook is not None:
                self.notify(job, WebhookEvent.progress, str(step))
            if 2 * step >= total and (ahead := self._prefetch) is not None:
                ahead.go.set()

        return on_step

    def _run_group(
        self,
        group: list[_Loaded],
        results: dict[str, JobStatus | None],
        finishing: list[tuple[EditJob, Future]],
    ) -> None:
        publisher = self._publisher
        # Canceled (or taken over) while its inputs were read: it does not run at all.
        running = []
        for item in group:
            leave = publisher.leaving(item.job.id) if publisher else None
            if leave is None:
                running.append(item)
            else:
                with bind_request_id(item.job.request_id, item.job.id):
                    results[item.job.id] = self._record_outcome(item, leave(), 0.0)
        group = running
        if not group:
            return
        started = time.perf_counter()
        failure: JobError | None = None
        denoising = publisher.denoising if publisher else _no_publisher
        try:
            with denoising([item.job.id for item in group]):
                outcomes = self.engine.predict_batch([item.request for item in group])
        except SoftTimeLimitExceeded:
            failure = JobError.of(JobErrorCode.timeout)
        except AdapterUnavailable as exc:
            # Names the adapter id only (where it failed to load from is in the log).
            failure = JobError.of(JobErrorCode.model_unavailable, str(exc))
        except Exception as exc:
            if is_out_of_memory(exc):
                failure = JobError.of(JobErrorCode.out_of_memory)
            else:
                log.exception("batch %s failed", [item.job.id for item in group])
                failure = _internal_error(exc)
        # Outside the except block: the traceback no longer pins the batch's tensors.
        if failure is not None and failure.code == JobErrorCode.out_of_memory:
            _release_gpu_memory()
            if len(group) > 1:
                # The batch was too big, not necessarily any one job: run them one by one.
                log.warning("batch of %d ran out of GPU memory; running its jobs alone", len(group))
                for item in group:
                    self._run_group([item], results, finishing)
                return
        if failure is not None:
            for item in group:
                results[item.job.id] = self._fail(item.job, failure)
            return
        engine_s = time.perf_counter() - started
        for item, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                with bind_request_id(item.job.request_id, item.job.id):
                    results[item.job.id] = self._record_outcome(item, outcome, engine_s)
            else:
                # Made, encoded and stored while the next batch denoises.
                future = self._finishers.submit(self._finish_job, item, outcome, engine_s)
                finishing.append((item.job, future))

    def _finish_job(self, item: _Loaded, outcome, engine_s: float) -> JobStatus | None:
        with bind_request_id(item.job.request_id, item.job.id):
            return self._record_outcome(item, outcome, engine_s)

    def _wait_finishing(
        self, finishing: list[tuple[EditJob, Future]], results: dict[str, JobStatus | None]
    ) -> None:
        """Wait for every job being finished; re-raise the first unforeseen error once all
        are done (the caller fails the jobs left without an outcome)."""
        error: BaseException | None = None
        while finishing:
            job, future = finishing.pop(0)
            try:
                results[job.id] = future.result()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    # -- reading the next batch ahead --------------------------------------------------

    def _start_prefetch(self) -> _Prefetch | None:
        if self.engine is None:
            return None
        ahead = _Prefetch()
        ahead.future = self._prefetcher.submit(self._read_ahead, ahead)
        self._prefetch = ahead
        return ahead

    def _end_prefetch(self, ahead: _Prefetch | None) -> Prefetched:
        """What was read ahead, once the current batch is done (nothing if the batch
        ended before its halfway step)."""
        self._prefetch = None
        if ahead is None:
            return []
        ahead.abandoned = not ahead.go.is_set()
        ahead.go.set()
        try:
            return ahead.future.result()
        except Exception:
            log.exception("reading the next batch ahead failed")
            return []

    def _read_ahead(self, ahead: _Prefetch) -> Prefetched:
        ahead.go.wait()
        if ahead.abandoned:
            return []
        found = self.jobs.oldest_pending(self.max_batch)
        if found is None:
            return []
        _, job_ids = found
        records = self.jobs.get_many(job_ids)
        queued = [job for job in records if job is not None and job.status == JobStatus.queued]
        futures = [(job, self._io.submit(self._load_inputs, job)) for job in queued]
        ready: Prefetched = []
        for job, future in futures:
            try:
                ready.append((job, future.result()))
            except Exception as exc:  # its own message runs it, and fails it if it must
                log.info("not reading job %s ahead: %s", job.id, exc)
        return ready

    def _claim_prefetched(self, upcoming: Prefetched, claimed: list[EditJob]) -> list[_Loaded]:
        """Claim the jobs read ahead that are still queued (nobody else took them), each
        added to `claimed` as soon as it is."""
        loaded: list[_Loaded] = []
        for job, inputs in upcoming:
            try:
                mine = self._claim(job.id, queued_only=True)
            except (TransitionRefused, JobNotFound):
                self.jobs.remove_pending(job.batch_key, job.id)
                continue
            claimed.append(mine)
            loaded.append(self._loaded(mine, inputs))
        if loaded:
            first, *others = (item.job for item in loaded)
            if others:
                log.info("job %s runs in a batch with %s", first.id, [j.id for j in others])
            log.info("running %d jobs read ahead in the same task", len(loaded))
        return loaded

    # -- outcomes ----------------------------------------------------------------------

    def _shaper(self, item: _Loaded) -> OutputShaper:
        """How the job's outputs are made as the client asked for them: at the photo's
        size with its detail kept, or at the model's; masked-out pixels the input's."""
        params: EditParams = item.job.params
        model_input = item.request.image
        size = item.original.size if params.output_size == OutputSize.input else model_input.size
        return OutputShaper(
            item.original,
            model_input,
            size,
            item.mask,
            params.mask_feather,
            device=self.engine.device,
        )

    def _store(self, item: _Loaded, shape: OutputShaper, edited: Image.Image, key: str) -> None:
        params = item.job.params
        fmt = OUTPUT_FORMATS[params.output_format]
        with bind_request_id(item.job.request_id, item.job.id):
            data = encode_output(shape(edited), params.output_format, params.output_quality)
            self.storage.put(key, data, fmt.content_type)

    def _record_outcome(self, item: _Loaded, outcome, engine_s: float) -> JobStatus | None:
        job = item.job
        if isinstance(outcome, JobCanceled):
            self._release(job)
            log.info("job %s was canceled while running", job.id)
            self._observe_canceled(job, engine_s)
            return JobStatus.canceled
        if isinstance(outcome, ClaimLost):
            self._release(job)
            log.warning("job %s was taken over by another worker; leaving it to them", job.id)
            return None
        if isinstance(outcome, BaseException):
            if is_out_of_memory(outcome):
                return self._fail(job, JobError.of(JobErrorCode.out_of_memory))
            log.error("job %s failed", job.id, exc_info=outcome)
            return self._fail(job, _internal_error(outcome))
        # Every output made and stored at once; the job succeeds only once all are stored.
        extension = OUTPUT_FORMATS[job.params.output_format].extension
        keys = [
            output_key(job.id, index, job.lease_owner or "unowned", extension)
            for index in range(len(outcome))
        ]
        shape = self._shaper(item)  # once for all of the job's outputs
        futures = [
            self._io.submit(self._store, item, shape, image, key)
            for image, key in zip(outcome, keys, strict=True)
        ]
        storage_error: str | None = None
        unforeseen: BaseException | None = None
        for index, future in enumerate(futures):
            try:
                future.result()
            except StorageError as exc:
                where = f"output {index + 1} of job {job.id} ({keys[index]})"
                log.warning("could not store %s: %s", where, exc)
                storage_error = (
                    storage_error or f"could not store output {index + 1} of {len(keys)}"
                )
            except Exception as exc:
                unforeseen = unforeseen or exc
        if unforeseen is not None:
            self._discard(keys)
            raise unforeseen
        if storage_error is not None:
            self._discard(keys)
            return self._fail(job, JobError.of(JobErrorCode.storage_error, storage_error))
        self._release(job)
        try:
            done = self.jobs.succeed(job, keys)
        except (TransitionRefused, JobNotFound) as refused:
            # Canceled as it finished, or taken over: these outputs belong to no job.
            self._discard(keys)
            if isinstance(refused, TransitionRefused) and refused.job.status == JobStatus.canceled:
                log.info("job %s was canceled as it finished", job.id)
                self._observe_canceled(job, engine_s)
                return JobStatus.canceled
            log.warning("job %s was taken over by another worker; dropped its outputs", job.id)
            return None
        log.info("job %s succeeded (batch engine time %.2fs)", job.id, engine_s)
        self.notify(done, WebhookEvent.completed)
        if self.observer:
            self.observer.job_finished(done, engine_s)
        return JobStatus.succeeded

    def _release(self, job: EditJob) -> None:
        if self._publisher is not None:
            self._publisher.release(job.id)

    def _discard(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.storage.delete(key)
            except StorageError as exc:
                log.warning("could not delete %s: %s", key, exc)

    def _observe_canceled(self, job: EditJob, engine_s: float) -> None:
        if not self.observer:
            return
        with contextlib.suppress(JobNotFound):
            self.observer.job_finished(self.jobs.get(job.id), engine_s)

    def _fail(self, job: EditJob, error: JobError) -> JobStatus | None:
        self._release(job)
        # What the client reads: never a server path or URL, whoever built the detail.
        error = public_error(error)
        with bind_request_id(job.request_id, job.id):
            log.warning("job %s failed: %s: %s", job.id, error.code, error.message)
        try:
            failed = self.jobs.fail(job, error)
        except (TransitionRefused, JobNotFound):
            return None
        self.notify(failed, WebhookEvent.completed)
        if self.observer:
            self.observer.job_finished(failed, 0.0)
        return JobStatus.failed


@contextlib.contextmanager
def _no_publisher(job_ids) -> Iterator[None]:
    yield


def _resized(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    return image if image.size == size else image.resize(size, resample)


def _internal_error(exc: BaseException) -> JobError:
    """The client learns the kind of error; its text (which may name files, hosts or
    settings) is in the log, where every caller has written it with its traceback."""
    return JobError.of(JobErrorCode.internal_error, type(exc).__name__)


# Absolute paths (POSIX, and Windows drive paths) and URLs, in a detail that should have
# named none: a last guard, not the way details are made.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S*")
_PATH = re.compile(r"(?<![\w.~/-])(?:[A-Za-z]:)?[/\\][^\s:;,'\"()\[\]]+")


def redact(text: str) -> str:
    """`text` with URLs and absolute paths replaced by placeholders."""
    return _PATH.sub("<path>", _URL.sub("<url>", text))


def public_error(error: JobError) -> JobError:
    """`error` as a job may show it to the client: its message redacted (see redact)."""
    message = redact(error.message)
    return error if message == error.message else error.model_copy(update={"message": message})


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
