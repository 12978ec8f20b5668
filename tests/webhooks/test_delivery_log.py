"""The log of delivery attempts kept beside each job in Redis."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from services.api.schemas import WebhookDelivery
from services.common.webhook_delivery import DELIVERY_LOG_LENGTH, DeliveryAttempt, DeliveryLog
from services.common.webhooks import WebhookEvent


def attempt(n: int, **fields) -> DeliveryAttempt:
    values = {
        "webhook_id": "msg_1",
        "event": WebhookEvent.completed,
        "attempt": n,
        "at": datetime.now(UTC),
        "status_code": 500,
        "error": "HTTP 500",
        "duration_ms": 12,
    }
    return DeliveryAttempt(**(values | fields))


def test_record_and_read_back(redis_url):
    client = redis.Redis.from_url(redis_url)
    log = DeliveryLog(client, ttl_s=600)
    first = attempt(1)
    last = attempt(2, status_code=204, error=None, final=True)
    log.record("job1", first)
    log.record("job1", last)
    assert log.attempts("job1") == [first, last]
    assert not first.ok and last.ok
    assert log.attempts("other") == []
    key = "instructedit:job:job1:webhook-deliveries"
    assert log.key("job1") == key
    assert 590 <= client.ttl(key) <= 600
    log.delete("job1")
    assert log.attempts("job1") == [] and not client.exists(key)


def test_only_the_latest_are_kept(redis_url):
    log = DeliveryLog(redis.Redis.from_url(redis_url), ttl_s=600, namespace="ns")
    for n in range(1, DELIVERY_LOG_LENGTH + 11):
        log.record("job1", attempt(n))
    kept = log.attempts("job1")
    assert len(kept) == DELIVERY_LOG_LENGTH
    assert [a.attempt for a in kept] == list(range(11, DELIVERY_LOG_LENGTH + 11))


def test_the_api_reads_the_records(redis_url):
    """The API renders the log with its own model (services/api/schemas.py)."""
    client = redis.Redis.from_url(redis_url)
    log = DeliveryLog(client, ttl_s=600)
    log.record("job1", attempt(1, status_code=None, error="timeout (read)", final=True))
    [raw] = client.lrange(log.key("job1"), 0, -1)
    seen = WebhookDelivery.model_validate_json(raw)
    assert seen.error == "timeout (read)" and seen.final and seen.status_code is None
