"""The delivery task: what it sends, what it logs, when it retries.

Most tests run the task in this process (Celery's eager mode runs each retry at once,
without its backoff); the last starts a real worker on the `webhooks` queue.
"""

from __future__ import annotations

import json
import sys

import pytest
import redis
from standardwebhooks import Webhook

from services.common.api_keys import KeyStore
from services.common.celery_app import create_celery_app
from services.common.edit_params import EditParams
from services.common.jobs import EditJob, JobStatus, JobStore
from services.common.queues import WEBHOOKS_QUEUE, enqueue_webhook
from services.common.settings import Settings
from services.common.webhook_delivery import DeliveryLog
from services.common.webhooks import WebhookEvent, WebhookSpec
from services.webhooks import tasks
from tests.stack import Service, service_env
from tests.webhooks import Receiver, answer


def render(job: EditJob) -> dict:
    return {"id": job.id, "status": job.status.value, "owner_never_shown": False}


def store_job(client: redis.Redis, url: str, owner: str, events=None) -> EditJob:
    spec = WebhookSpec(url=url) if events is None else WebhookSpec(url=url, events=events)
    job = EditJob.new(EditParams(prompt="make it red"), "image/png", owner=owner, webhook=spec)
    job = job.model_copy(update={"status": JobStatus.succeeded})
    client.set(f"instructedit:job:{job.id}", job.model_dump_json(), ex=600)
    return job


def fail_then(failures: int, status: int = 500):
    def behaviour(handler, request, index):
        answer(status if index < failures else 200)(handler, request, index)

    return behaviour


@pytest.fixture
def env(redis_url, monkeypatch):
    """The task's dependencies on this test's Redis database, with the test renderer."""
    client = redis.Redis.from_url(redis_url)
    deps = tasks.Dependencies(
        jobs=JobStore(client, 600),
        keys=KeyStore(client),
        log=DeliveryLog(client, 600),
        allowed_hosts=("127.0.0.1",),
        timeout_s=2.0,
    )
    monkeypatch.setattr(tasks, "_deps", deps)
    monkeypatch.setattr(tasks, "_render", render)
    created = deps.keys.create("webhook test")
    return client, deps, created


def run(job_id: str, event: str = "completed", webhook_id: str = "msg_abc"):
    return tasks.deliver_webhook.apply(args=[job_id, event, webhook_id])


def test_max_retries_follow_the_retry_time():
    assert tasks.max_retries_for(0) == 0
    assert tasks.max_retries_for(1) == 1
    assert tasks.max_retries_for(2) == 1
    assert tasks.max_retries_for(3) == 2
    # 1 + 2 + ... + 512 = 1023 s, then 600 s each: 14 retries fit 3600 s.
    assert tasks.max_retries_for(3600) == 14
    assert tasks.max_retries_for(3600, backoff_max_s=60) == 7 + (3600 - 127) // 60
    assert tasks.max_retries_for(tasks.settings.webhook_retry_for_s) == tasks.MAX_RETRIES
    task = tasks.deliver_webhook
    assert task.max_retries == tasks.MAX_RETRIES
    assert task.name == "instructedit.webhooks.deliver"
    assert task.acks_late and task.ignore_result
    assert task.retry_backoff and task.retry_jitter and task.retry_backoff_max == 600


def test_delivers_a_signed_payload(env):
    client, deps, created = env
    with Receiver() as receiver:
        job = store_job(client, receiver.url(), created.id)
        run(job.id)
    [request] = receiver.received
    headers = {k.lower(): v for k, v in request.headers.items()}
    body = Webhook(created.webhook_secret).verify(request.body, headers)
    assert body["type"] == "edit.completed"
    assert body["data"] == render(job)
    assert body["timestamp"].endswith("+00:00")
    assert headers["webhook-id"] == "msg_abc"
    [attempt] = deps.log.attempts(job.id)
    assert attempt.ok and attempt.final and attempt.attempt == 1
    assert attempt.webhook_id == "msg_abc" and attempt.event == WebhookEvent.completed
    assert attempt.status_code == 204


def test_retries_until_it_succeeds(env):
    client, deps, created = env
    with Receiver(fail_then(2)) as receiver:
        job = store_job(client, receiver.url(), created.id)
        run(job.id)
    assert len(receiver.received) == 3
    assert {r.headers["webhook-id"] for r in receiver.received} == {"msg_abc"}
    attempts = deps.log.attempts(job.id)
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert [a.status_code for a in attempts] == [500, 500, 200]
    assert [a.final for a in attempts] == [False, False, True]
    assert attempts[-1].ok


def test_gives_up_after_max_retries(env, monkeypatch):
    client, deps, created = env
    monkeypatch.setattr(tasks.deliver_webhook, "max_retries", 2)
    with Receiver(answer(503)) as receiver:
        job = store_job(client, receiver.url(), created.id)
        run(job.id)
    assert len(receiver.received) == 3
    attempts = deps.log.attempts(job.id)
    assert [a.final for a in attempts] == [False, False, True]
    assert not attempts[-1].ok and attempts[-1].error == "HTTP 503"


@pytest.mark.parametrize("status", [400, 404, 429])
def test_client_errors_are_retried_too(env, monkeypatch, status):
    client, deps, created = env
    with Receiver(fail_then(1, status)) as receiver:
        job = store_job(client, receiver.url(), created.id)
        run(job.id)
    assert [a.status_code for a in deps.log.attempts(job.id)] == [status, 200]


def test_gone_is_final(env):
    client, deps, created = env
    with Receiver(answer(410)) as receiver:
        job = store_job(client, receiver.url(), created.id)
        run(job.id)
    assert len(receiver.received) == 1
    [attempt] = deps.log.attempts(job.id)
    assert attempt.final and attempt.status_code == 410


def test_a_url_refused_at_send_time_is_final(env, monkeypatch):
    client, deps, created = env
    monkeypatch.setattr(deps, "allowed_hosts", ())
    with Receiver() as receiver:
        job = store_job(client, receiver.url(), created.id)
        run(job.id)
    assert receiver.received == []
    [attempt] = deps.log.attempts(job.id)
    assert attempt.final and attempt.status_code is None
    assert attempt.error.startswith("refused: ")


def test_events_the_job_did_not_ask_for_are_not_sent(env):
    client, deps, created = env
    with Receiver() as receiver:
        job = store_job(client, receiver.url(), created.id, events=[WebhookEvent.start])
        run(job.id, "progress")
        run(job.id, "start")
    assert len(receiver.received) == 1
    assert json.loads(receiver.received[0].body)["type"] == "edit.start"
    assert len(deps.log.attempts(job.id)) == 1


def test_nothing_is_sent_for_a_deleted_job_or_a_job_without_webhook(env):
    client, deps, created = env
    run("0" * 32)
    job = EditJob.new(EditParams(prompt="x"), "image/png", owner=created.id)
    client.set(f"instructedit:job:{job.id}", job.model_dump_json(), ex=600)
    run(job.id)
    assert deps.log.attempts(job.id) == []


def test_a_real_worker_retries_with_backoff(redis_url, tmp_path):
    """The task on the `webhooks` queue of a real worker, started as in production (threads
    pool): a receiver failing twice gets the same delivery a third time, backed off."""
    client = redis.Redis.from_url(redis_url)
    created = KeyStore(client).create("webhook e2e")
    env = service_env(redis_url=redis_url, webhook_allowed_hosts="127.0.0.1", webhook_timeout_s="2")
    boot = (
        "import services.webhooks.tasks as t; "
        "t._render = lambda job: {'id': job.id, 'status': job.status.value}; "
        "t.app.worker_main(['worker', '--queues', 'webhooks', '--pool', 'threads', "
        "'--concurrency', '4', '--loglevel', 'INFO', '--without-mingle', '--without-gossip', "
        "'--hostname', 'webhooks-test@%h'])"
    )
    worker = Service("webhooks-worker", [sys.executable, "-c", boot], env, tmp_path)
    try:
        with Receiver(fail_then(2)) as receiver:
            job = store_job(client, receiver.url(), created.id)
            enqueue_webhook(
                create_celery_app(Settings(redis_url=redis_url)), job.id, "completed", "msg_e2e"
            )
            log = DeliveryLog(client, 600)

            def delivered() -> bool:
                attempts = log.attempts(job.id)
                return bool(attempts) and attempts[-1].final

            worker.wait_until(delivered, 9, "delivered")
    finally:
        worker.stop()
    attempts = log.attempts(job.id)
    assert [(a.attempt, a.status_code, a.final) for a in attempts] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]
    assert [r.headers["webhook-id"] for r in receiver.received] == ["msg_e2e"] * 3
    secret = created.webhook_secret
    for request in receiver.received:
        headers = {k.lower(): v for k, v in request.headers.items()}
        assert Webhook(secret).verify(request.body, headers)["data"]["id"] == job.id
    # Nothing left queued for the webhooks queue.
    assert client.llen(WEBHOOKS_QUEUE) == 0
    assert client.llen("edits") == 0  # nothing went to the GPU workers' queue
