"""One settings class for every service; read from `INSTRUCTEDIT_*` environment variables."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_EDIT_MODEL = "timbrooks/instruct-pix2pix"
DEFAULT_DATAGEN_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)
_BUCKET_SIZE = re.compile(r"^\d+x\d+$")


def parse_batch_buckets(value: object) -> object:
    """ "1,2,4,8" (the environment's form) as (1, 2, 4, 8); anything else as it is."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            message = f"batch buckets are whole numbers separated by commas: {value!r}"
            raise ValueError(message) from None
    return value


def check_batch_buckets(value: tuple[int, ...]) -> tuple[int, ...]:
    if not value or any(size < 1 for size in value):
        raise ValueError(f"batch buckets are sizes of at least 1, at least one: {value!r}")
    return tuple(sorted(set(value)))


def check_warmup_buckets(value: str | None) -> str | None:
    """None or blank: the engine's default; "all"; or sizes "WxH" separated by commas."""
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    sizes = [part.strip() for part in value.split(",")]
    if value != "all" and not all(_BUCKET_SIZE.match(size) for size in sizes):
        raise ValueError(f'warm-up buckets are "all" or sizes like "512x512,640x384": {value!r}')
    return value if value == "all" else ",".join(sizes)


# The two engine settings with a syntax of their own, as types: the settings and the
# engine's options (services/gpu_worker/engine.py) validate them alike.
BatchBuckets = Annotated[
    tuple[int, ...], BeforeValidator(parse_batch_buckets), AfterValidator(check_batch_buckets)
]
WarmupBuckets = Annotated[str | None, AfterValidator(check_warmup_buckets)]


def _parse_names(value: object) -> object:
    """ "a, b/c" (the environment's form) as ("a", "b/c"), case kept (model ids)."""
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return value


def _parse_hosts(value: object) -> object:
    """ "a.example, b.internal" (the environment's form) as ("a.example", "b.internal")."""
    if isinstance(value, str):
        return tuple(host.strip().lower() for host in value.split(",") if host.strip())
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INSTRUCTEDIT_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"

    # file://<dir> (relative paths resolve against the working directory) or s3://bucket[/prefix]
    storage_url: str = "file://./var/storage"
    s3_endpoint_url: str | None = None
    # Presigned URLs are signed for this endpoint: in compose the services reach MinIO as
    # http://minio:9000, which a client on the host cannot resolve.
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # The secret that signs output URLs of file storage (services/api/signed_urls.py);
    # unset, the API processes share a random one kept in Redis.
    url_signing_secret: str | None = None
    # Output URLs are signed for each response and stop working after this.
    presigned_url_expiry_s: int = Field(900, ge=1, le=7 * 24 * 3600)

    model: str = DEFAULT_EDIT_MODEL
    datagen_model: str = DEFAULT_DATAGEN_MODEL
    # Models a dataset run may name as `model` / `clip_model` (hub ids or directories, as
    # the loaders take them). Clients never name anything else: unset, only the server's
    # own (null in the spec).
    datagen_models: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_parse_names)] = ()
    datagen_clip_models: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_parse_names)] = ()
    # Base models a fine-tune (POST /v1/finetunes) may name as `base_model`, as the
    # datagen ones; unset, only the edit model (`model`, null in the request).
    finetune_base_models: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_parse_names)] = ()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The model's area budget as a side length: it runs at the resolution bucket of about
    # resolution^2 pixels nearest each photo's aspect ratio (services/common/buckets.py).
    # Unset: the model family's (512 for SD 1.5, 768 for SDXL), or the model's own default
    # size when that is smaller (the tiny test models). The API keys its batching index
    # by it, so set it for the API too when serving another budget than 512.
    resolution: int | None = Field(None, ge=64, le=2048)

    # Dynamic batching: a worker runs up to `max_batch` compatible jobs in one UNet call,
    # waiting at most `batch_window_ms` for more to arrive (0: take what is queued, at once).
    # The engine counts a batch in outputs (the UNet's samples: a job's num_outputs each)
    # and runs at most max(max_batch, 4) of them per UNet call: more run in turn.
    max_batch: int = Field(8, ge=1, le=64)
    # The batch sizes, in outputs, a compiled UNet runs at: a batch is padded up to the
    # next one (3 outputs run as 4, the padding's results discarded), so that the UNet sees
    # a few fixed shapes; those above max(max_batch, 4) are dropped and that is added as the
    # largest. "1,2,4,8" in the environment. An eager UNet runs batches at their own size.
    batch_buckets: Annotated[BatchBuckets, NoDecode] = DEFAULT_BATCH_BUCKETS
    batch_window_ms: int = Field(0, ge=0, le=5000)
    # A running job's claim, renewed by the worker's heartbeat (every third of it), so it
    # only lapses when the worker that holds it died; then another may take the job over.
    job_lease_s: float = Field(60.0, gt=0)
    # Recovery of jobs whose queue message was lost (a broker failover, a crash between
    # accepting and publishing, a task acked on failure): the workers' reaper sends a job
    # again when it is still queued this long after it was accepted, or when its lease
    # lapsed. A duplicate message is harmless: a job is claimed once.
    job_redeliver_after_s: float = Field(600.0, gt=0)
    reaper_interval_s: float = Field(15.0, gt=0)
    # torch.compile of the UNet, compiled and warmed up at worker start; pays off on CUDA.
    # "reduce-overhead" (fused kernels + CUDA graphs, diffusers' advice) compiles in a minute
    # or two; "max-autotune" also searches GEMM configurations, adding many minutes to every
    # worker start for a few percent.
    # Compiled with static shapes (fullgraph, one graph per resolution bucket x batch
    # bucket x guidance mode), every one of them at worker start (warmup_buckets).
    compile_unet: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "reduce-overhead"
    warmup: bool = True
    # The resolution buckets warmed up at worker start: "all" of the engine's, or sizes
    # "512x512,640x384". Unset: all of them with compile_unet (each with every batch
    # bucket, with and without guidance: nothing compiles after start), else the square
    # bucket at one output, guided.
    warmup_buckets: WarmupBuckets = None
    # The UNet's attention: PyTorch's scaled_dot_product_attention ("sdpa": flash or
    # memory-efficient kernels on CUDA, and traceable by torch.compile), xformers (when
    # installed; it breaks torch.compile's graph, so a compiled UNet keeps SDPA), or sliced
    # attention (least memory, slowest).
    attention: Literal["sdpa", "xformers", "sliced"] = "sdpa"
    # Memory fallbacks for small GPUs or large images. attention_slicing is attention="sliced"
    # (kept for existing deployments).
    attention_slicing: bool = False
    vae_tiling: bool = False
    text_embedding_cache_size: int = Field(512, ge=0)
    # LoRA adapters (the `adapter` of an edit) a worker keeps loaded on its model, least
    # recently used dropped first; loading one takes a moment and never reloads the model.
    # With compile_unet, LoRA layers change the UNet's graph: a batch with another adapter
    # setup than before recompiles (counted and logged as recompiles; past dynamo's
    # recompile limit the UNet runs eagerly), so adapters are best served eager.
    adapter_cache_size: int = Field(4, ge=1, le=64)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)

    # Retention: a job's record and its stored images (input, mask, outputs) are deleted
    # together this long after the job's last change (the workers' reaper removes them).
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    # Hard and soft Celery limits per edit task; the soft one ends the job as failed cleanly.
    task_soft_time_limit_s: int = Field(900, ge=1)
    task_time_limit_s: int = Field(960, ge=1)
    # Loading a full model from disk into a GPU can take minutes: Celery's default of
    # 4 s for a new child to report alive would kill it mid-load.
    worker_proc_alive_timeout_s: float = Field(600.0, ge=4)

    # Absolute base for output URLs of file storage: where clients reach the API (behind a
    # proxy, its public address). Never taken from a request's Host header, which the
    # client controls. The default is where `make run` serves.
    public_base_url: str = "http://127.0.0.1:8000"

    # Observability. Logs are one JSON object per line on stderr unless log_json is false.
    log_level: str = "INFO"
    log_json: bool = True
    # The worker's Prometheus endpoint (served by the Celery parent for all its pool
    # processes); 0 turns it off.
    worker_metrics_port: int = Field(9100, ge=0, le=65535)

    # The edit worker's pipelining (services/gpu_worker/edit_job.py). Threads that read and
    # decode inputs and make, encode and store outputs while the GPU denoises.
    io_threads: int = Field(4, ge=1, le=64)
    # Batches a worker task runs after its own, from the oldest pending jobs, whose inputs
    # it read while the batch before denoised (0: one batch a task).
    prefetch_batches: int = Field(4, ge=0, le=64)

    # --- Who may do what (services/common/api_keys.py, services/api/auth.py) -------------
    # "required": every /v1 request carries an API key (`keys create`). "disabled" is for
    # local development only: every request acts as the one local caller.
    auth: Literal["required", "disabled"] = "required"
    # Per key: submissions (edits and dataset runs) in any moving window, in the `limits`
    # library's notation ("60/minute", "10/second;300/hour"), and jobs not yet finished.
    rate_limit: str = "120/minute"
    max_unfinished_jobs_per_key: int = Field(200, ge=1)
    # Backpressure: above this many unfinished edit jobs in all, or an estimated wait above
    # max_queue_wait_s, submissions get 503 queue_full with Retry-After instead of waiting.
    max_queue_depth: int = Field(10_000, ge=1)
    max_queue_wait_s: float = Field(3600.0, gt=0)
    # An Idempotency-Key is remembered this long with the job it created.
    idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    # Webhooks go only to public addresses, except to these hosts (comma-separated), for
    # receivers inside the deployment.
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_parse_hosts)] = ()
    webhook_timeout_s: float = Field(10.0, gt=0, le=60)
    # Retries of a failed delivery, with exponential backoff and jitter, for about this long.
    webhook_retry_for_s: float = Field(3600.0, ge=0)

    # --- Input handling of the API -------------------------------------------------------
    # Uploads the API checks at once (each may decode a picture of up to MAX_PIXELS);
    # more wait for a slot. Unset: twice the CPUs.
    max_concurrent_decodes: int | None = Field(None, ge=1, le=1024)
    # How long the API waits for the next part of a request body before it answers 408
    # and closes the connection (a client that declares more than it sends).
    body_read_timeout_s: float = Field(30.0, gt=0)


@lru_cache
def get_settings() -> Settings:
    return Settings()
