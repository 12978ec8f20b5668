"""Prometheus metrics of the API and its `/metrics` route.

With PROMETHEUS_MULTIPROC_DIR set (an empty directory, before the server starts: needed for
`uvicorn --workers N` or gunicorn), every server process writes its samples there and
`/metrics` answers with the sum over all of them; without it, with this process's own.
The queue depth is read from Redis when Prometheus scrapes, never counted by the API.
"""

from __future__ import annotations

import logging
import os

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from services.common.queues import EDITS_QUEUE

log = logging.getLogger(__name__)

# `*_created` timestamps double the series for nothing a dashboard uses (multiprocess
# mode never has them, so this also makes one process look like several).
disable_created_metrics()

REQUESTS = Counter(
    "instructedit_api_requests",
    "HTTP requests answered, by route template and status code.",
    ["method", "route", "status"],
)
REQUEST_DURATION = Histogram(
    "instructedit_api_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by route template.",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
JOBS_SUBMITTED = Counter(
    "instructedit_api_jobs_submitted",
    "Edit jobs accepted and enqueued.",
)


class QueueDepthCollector:
    """`instructedit_queue_depth{queue}`: messages waiting in the broker list, at scrape time."""

    def __init__(self, client: redis.Redis, queues: tuple[str, ...] = (EDITS_QUEUE,)) -> None:
        self.client = client
        self.queues = queues

    def collect(self):
        depth = GaugeMetricFamily(
            "instructedit_queue_depth",
            "Jobs waiting in the Redis broker queue (LLEN), read at scrape time.",
            labels=["queue"],
        )
        up = GaugeMetricFamily(
            "instructedit_api_redis_up", "1 when the API reached Redis at this scrape."
        )
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    pipe.llen(queue)
                lengths = pipe.execute()
        except redis.RedisError as exc:
            log.warning("reading the queue depth failed: %s", exc)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for queue, length in zip(self.queues, lengths, strict=True):
                depth.add_metric([queue], length)
            yield depth
        yield up


class _ProcessMetrics:
    """This process's default registry, as one collector of a scrape registry."""

    def collect(self):
        return REGISTRY.collect()


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def scrape_registry(client: redis.Redis) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_mode():
        MultiProcessCollector(registry)
    else:
        registry.register(_ProcessMetrics())
    registry.register(QueueDepthCollector(client))
    return registry


router = APIRouter(tags=["observability"])


@router.get("/metrics", response_class=Response, include_in_schema=False)
def metrics(request: Request) -> Response:
    body = generate_latest(scrape_registry(request.app.state.redis))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
