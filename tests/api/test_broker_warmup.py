"""The API opens its broker connections at startup, not during the first burst of submits."""

from __future__ import annotations

import time

import redis
from fastapi.testclient import TestClient

from services.api.main import create_app, warm_broker_connections
from services.common.celery_app import create_celery_app
from services.common.settings import Settings
from tests.stack import free_port


def clients_on(url: str) -> int:
    client = redis.Redis.from_url(url)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    return sum(1 for c in client.client_list() if int(c.get("db", -1)) == db)


def test_startup_opens_the_producer_pool(settings):
    before = clients_on(settings.redis_url)
    app = create_app(settings, warm_broker=True)
    with TestClient(app):
        deadline = time.monotonic() + 10
        limit = app.state.celery.conf.broker_pool_limit
        while clients_on(settings.redis_url) < before + limit and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clients_on(settings.redis_url) >= before + limit


def test_warmup_without_redis_returns_at_once():
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    warm_broker_connections(create_celery_app(Settings(redis_url=url)), redis.Redis.from_url(url))
    assert time.monotonic() - started < 5
