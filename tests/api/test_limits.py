"""Submission limits: a per-key rate, a per-key cap on unfinished jobs, and queue
backpressure; each answers with the error envelope and Retry-After, and holds across API
processes sharing one Redis."""

import concurrent.futures
import time

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from limits.strategies import MovingWindowRateLimiter

from services.api.main import create_app
from services.common.api_keys import KeyStore
from services.common.job_events import finish_entry
from services.common.jobs import utcnow
from tests.api.conftest import create_key, keyed_client
from tests.api.test_edits import submit
from tests.api.test_upload_limit import serve
from tests.conftest import image_bytes

PNG = image_bytes()


def _app_client(settings, **limits):
    return keyed_client(create_app(settings.model_copy(update=limits)))


def _assert_refused(response, status: int, code: str) -> int:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["message"]
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    return int(retry_after)


def _no_new_job(client, settings, before_inputs: list[str], before_records: int) -> None:
    storage = client.app.state.storage
    assert storage.list("") == before_inputs
    r = redis.Redis.from_url(settings.redis_url)
    assert len(r.keys("instructedit:job:*")) == before_records


# -- rate -------------------------------------------------------------------------


def test_rate_limit_refuses_the_fourth_submission(settings, queue_len):
    with _app_client(settings, rate_limit="3/minute") as client:
        for _ in range(3):
            assert submit(client).status_code == 202
        inputs = client.app.state.storage.list("")
        retry_after = _assert_refused(submit(client), 429, "rate_limited")
        assert retry_after <= 60
        _no_new_job(client, settings, inputs, 3)
        assert queue_len() == 3
        # Another key has a window of its own.
        other = keyed_client(client.app)
        for _ in range(3):
            assert submit(other).status_code == 202
        _assert_refused(submit(other), 429, "rate_limited")
        # Reading is not limited.
        assert client.get("/v1/edits").status_code == 200


def test_refused_submissions_do_not_count_against_the_rate(settings):
    """A 429 is not counted: the window frees up as the accepted ones age, not later."""
    with _app_client(settings, rate_limit="2/minute") as client:
        assert submit(client).status_code == 202
        assert submit(client).status_code == 202
        for _ in range(5):
            _assert_refused(submit(client), 429, "rate_limited")
        limiter = client.app.state.limits
        (rate,) = limiter._rates
        _, remaining = limiter._limiter.get_window_stats(rate, "submit", client.key_id)
        assert remaining == 0
        # Exactly two entries in the window: the accepted submissions.
        assert limiter._limiter.test(rate, "submit", "someone-else")


def test_rate_limit_holds_across_two_api_processes(settings):
    limited = settings.model_copy(update={"rate_limit": "2/minute"})
    with keyed_client(create_app(limited)) as first, TestClient(create_app(limited)) as second:
        second.headers["Authorization"] = first.headers["Authorization"]
        assert submit(first).status_code == 202
        assert submit(second).status_code == 202
        _assert_refused(submit(first), 429, "rate_limited")
        _assert_refused(submit(second), 429, "rate_limited")
        assert len(first.get("/v1/edits").json()["data"]) == 2


def test_several_rates_all_apply(settings):
    with _app_client(settings, rate_limit="2/second;3/minute") as client:
        assert submit(client).status_code == 202
        assert submit(client).status_code == 202
        _assert_refused(submit(client), 429, "rate_limited")


# -- unfinished jobs per key -------------------------------------------------------


def test_unfinished_cap_per_key(settings, queue_len):
    with _app_client(settings, max_unfinished_jobs_per_key=2) as client:
        first = submit(client).json()["id"]
        assert submit(client).status_code == 202
        _assert_refused(submit(client), 429, "too_many_unfinished_jobs")
        # (Its stored upload: test_a_submission_refused_at_creation_leaves_no_stored_upload.)
        assert len(redis.Redis.from_url(settings.redis_url).keys("instructedit:job:*")) == 2
        assert queue_len() == 2
        # Another key has a cap of its own.
        other = keyed_client(client.app)
        assert submit(other).status_code == 202
        # A finished job no longer counts.
        assert client.post(f"/v1/edits/{first}/cancel").status_code == 200
        assert submit(client).status_code == 202
        _assert_refused(submit(client), 429, "too_many_unfinished_jobs")


def test_deleting_an_unfinished_job_frees_its_place(settings):
    with _app_client(settings, max_unfinished_jobs_per_key=1) as client:
        job_id = submit(client).json()["id"]
        _assert_refused(submit(client), 429, "too_many_unfinished_jobs")
        assert client.delete(f"/v1/edits/{job_id}").status_code == 204
        assert submit(client).status_code == 202


def test_unfinished_cap_holds_for_concurrent_submissions(settings):
    limited = settings.model_copy(update={"max_unfinished_jobs_per_key": 2})
    codes = _concurrent_submissions(limited, 8)
    assert sorted(codes) == [202, 202] + [429] * 6
    app_redis = redis.Redis.from_url(settings.redis_url)
    assert len(app_redis.keys("instructedit:job:*")) == 2


# -- backpressure ------------------------------------------------------------------


def test_queue_depth_refuses_with_503_and_leaves_nothing(settings, queue_len):
    with _app_client(settings, max_queue_depth=2) as client:
        others = [keyed_client(client.app) for _ in range(2)]
        for other in others:
            assert submit(other).status_code == 202
        inputs = client.app.state.storage.list("")
        assert len(inputs) == 2
        _assert_refused(submit(client), 503, "queue_full")
        _assert_refused(submit(client, mask=image_bytes(mode="L")), 503, "queue_full")
        _no_new_job(client, settings, inputs, 2)
        assert queue_len() == 2
        assert client.get("/v1/edits").json()["data"] == []
        # Once a job finishes there is room again.
        job_id = others[0].get("/v1/edits").json()["data"][0]["id"]
        assert others[0].post(f"/v1/edits/{job_id}/cancel").status_code == 200
        assert submit(client).status_code == 202


def test_queue_depth_holds_across_two_api_processes(settings):
    limited = settings.model_copy(update={"max_queue_depth": 2})
    with keyed_client(create_app(limited)) as first, keyed_client(create_app(limited)) as second:
        assert submit(first).status_code == 202
        assert submit(second).status_code == 202
        _assert_refused(submit(first), 503, "queue_full")
        _assert_refused(submit(second), 503, "queue_full")


def test_estimated_wait_over_the_limit_is_503(settings):
    with _app_client(settings, max_queue_wait_s=30) as client:
        # Recent successes one a minute apart, each taking a minute: one job a minute.
        now = utcnow().timestamp()
        r = client.app.state.redis
        for i in range(5):
            r.lpush("instructedit:recent-finishes", finish_entry(now - 60 * (5 - i), 60.0))
        assert client.app.state.jobs.recent_finishes()
        other = keyed_client(client.app)
        accepted = 0
        for _ in range(3):
            if submit(other).status_code == 202:
                accepted += 1
        assert accepted < 3
        retry_after = _assert_refused(submit(client), 503, "queue_full")
        assert retry_after > 5


@pytest.mark.parametrize("limit", ["3/minute"])
def test_keys_made_in_other_apps_are_limited_alike(settings, limit):
    limited = settings.model_copy(update={"rate_limit": limit})
    app = create_app(limited)
    key = create_key(app, "shared")
    with TestClient(app) as a, TestClient(create_app(limited)) as b:
        a.headers["X-API-Key"] = key.key
        b.headers["Authorization"] = f"Bearer {key.key}"
        codes = [submit(c).status_code for c in (a, b, a, b)]
    assert codes == [202, 202, 202, 429]


@pytest.mark.parametrize("reason", ["too_many_unfinished", "queue_full"])
def test_a_submission_refused_at_creation_leaves_no_stored_upload(settings, reason):
    """JobStore.create keeps both limits atomically, after the upload was stored: a
    refusal there must delete the stored input and mask, as a Redis failure does
    (services/api/submission.py)."""
    limit = {"too_many_unfinished": "max_unfinished_jobs_per_key", "queue_full": "max_queue_depth"}
    with _app_client(settings, **{limit[reason]: 1}) as client:
        assert submit(client).status_code == 202
        inputs = client.app.state.storage.list("")
        # A concurrent submission got past the early backlog check before the queue filled
        # (the race JobStore.create's atomic check exists for).
        client.app.state.limits.check_backlog = lambda jobs: None
        code = "too_many_unfinished_jobs" if reason == "too_many_unfinished" else "queue_full"
        status = 429 if reason == "too_many_unfinished" else 503
        _assert_refused(submit(client, mask=image_bytes(mode="L")), status, code)
        _no_new_job(client, settings, inputs, 1)


def _concurrent_submissions(settings, n: int) -> list[int]:
    with serve(settings) as port:
        key = KeyStore(redis.Redis.from_url(settings.redis_url)).create("racer").key

        def post(_):
            return httpx.post(
                f"http://127.0.0.1:{port}/v1/edits",
                headers={"Authorization": f"Bearer {key}"},
                files={"image": ("a.png", PNG, "image/png")},
                data={"prompt": "make it red"},
                timeout=30,
            ).status_code

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            return sorted(pool.map(post, range(n)))


def test_rate_limit_holds_for_concurrent_submissions(settings):
    codes = _concurrent_submissions(settings.model_copy(update={"rate_limit": "3/minute"}), 8)
    assert codes == [202] * 3 + [429] * 5


def test_rate_limit_holds_when_checks_interleave(settings, monkeypatch):
    """Two submissions that both pass the window's check before either is counted (the
    scheduler may always do this): the count must still stop at the limit. Widened here
    with a pause after the check."""
    real_test = MovingWindowRateLimiter.test

    def slow_test(self, *args, **kwargs):
        result = real_test(self, *args, **kwargs)
        time.sleep(0.3)
        return result

    monkeypatch.setattr(MovingWindowRateLimiter, "test", slow_test)
    codes = _concurrent_submissions(settings.model_copy(update={"rate_limit": "2/minute"}), 6)
    assert codes.count(202) == 2, codes
