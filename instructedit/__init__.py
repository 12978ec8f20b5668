"""The InstructEdit Python SDK: edit product photos by text instruction.

from instructedit import Client

with Client() as client:  # $INSTRUCTEDIT_URL, $INSTRUCTEDIT_API_KEY
    job = client.edit("hoodie.jpg", "make it red", num_inference_steps=20)
    job.wait(progress=lambda j: print(j.status, j.progress_step, j.progress_total))
    job.raise_for_status().download("out/")
"""

from __future__ import annotations

__version__ = "0.1.0"

from instructedit.client import AsyncClient, AsyncDatasets, Client, Datasets
from instructedit.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConflictError,
    InstructEditError,
    InvalidRequestError,
    JobFailed,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from instructedit.jobs import AsyncJob, Job

__all__ = [
    "APIConnectionError",
    "APIError",
    "AsyncClient",
    "AsyncDatasets",
    "AsyncJob",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "Datasets",
    "InstructEditError",
    "InvalidRequestError",
    "Job",
    "JobFailed",
    "NotFoundError",
    "RateLimitError",
    "ServiceUnavailableError",
    "__version__",
]
