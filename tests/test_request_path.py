"""One path per request (api/request_path.py, api/ratelimit.py): every route of the app, its refusals and Flask's
own 404/405 included, gets the same per-request work (request id, CORS, metrics, the access line), POST /analyze
has one implementation, and its rate-limit count is taken once whatever answers. Over HTTP against a real API
process and Redis, and in-process for a route added after the app was built."""

from __future__ import annotations

import re
import uuid
from typing import Iterator

import pytest
import requests

from potpie_service.api import create_app
from potpie_service.auth import new_key
from potpie_service.config import Settings
from potpie_service.store.keys import Keys
from tests.conftest import Stack, make_stack

KEY, ENTRY = new_key("carol")
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def lean(redis_server, simulator) -> Iterator[Stack]:
    running = make_stack(redis_server, simulator, "lean", workers=0, AUTH_DISABLED="false", API_KEYS=ENTRY,
                         RATE_LIMIT="50/minute", CORS_ORIGINS=ORIGIN, DEDUP_ENABLED="false")
    yield running
    running.stop()


def post(stack: Stack, body: bytes, content_type: str = "application/json", key: str = KEY,
         request_id: str | None = None) -> requests.Response:
    headers = {"Content-Type": content_type, "X-API-Key": key, "Origin": ORIGIN}
    return requests.post(stack.url + "/analyze", data=body, timeout=5,
                         headers={**headers, "X-Request-ID": request_id} if request_id else headers)


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/analyze", b'{"repo": "octocat/one-path"}', 202),
    ("POST", "/analyze", b'{"repo": "octocat/x", "colour": "red"}', 400),
    ("GET", "/status/" + "0" * 32, None, 404),
    ("GET", "/livez", None, 200),
    ("GET", "/no/such/route", None, 404),
    ("PUT", "/analyze", None, 405),
])
def test_every_route_and_error_gets_the_request_id_cors_metrics_and_access_line(lean: Stack, method: str, path: str,
                                                                               body: bytes | None,
                                                                               status: int) -> None:
    request_id = f"rp-{uuid.uuid4().hex[:8]}"
    answer = requests.request(method, lean.url + path, data=body, timeout=5,
                              headers={"Content-Type": "application/json", "X-API-Key": KEY, "Origin": ORIGIN,
                                       "X-Request-ID": request_id})
    assert answer.status_code == status, answer.text
    assert answer.headers["X-Request-ID"] == request_id
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN and answer.headers["X-Frame-Options"] == "DENY"
    lines = [line for line in lean.api.log_lines() if line.get("request_id") == request_id]
    access = [line for line in lines if line["logger"] == "potpie_service.access"]
    if path != "/livez":  # probes are measured, not logged
        assert len(access) == 1 and access[0]["status"] == status and access[0]["method"] == method, lines
    route = {"/livez": "/livez", "/analyze": "/analyze"}.get(path, "/status/<job_id>" if "status" in path
                                                          else "unmatched")
    if method == "PUT":
        route = "unmatched"  # Flask refuses the method before it routes the request
    scraped = requests.get(lean.url + "/metrics", headers={"X-API-Key": KEY}, timeout=5).text
    assert re.search(rf'potpie_http_request_duration_seconds_count{{method="{method}",route="{re.escape(route)}",'
                     rf'status="{status}"}} [1-9]', scraped), (method, route, status)


def test_a_submit_is_answered_by_its_one_view_and_counted_once_whatever_answers(lean: Stack) -> None:
    other, entry = new_key("dave")  # a budget of its own
    stack = make_stack(lean.redis, lean.simulator, "lean-limit", workers=0, AUTH_DISABLED="false",
                       API_KEYS=entry, RATE_LIMIT="4/minute", DEDUP_ENABLED="false")
    try:
        remaining = [post(stack, b'{"repo": "octocat/count-1"}', key=other),
                     post(stack, b'{"repo": "octocat/x", "colour": "red"}', key=other),  # a 400 is counted too
                     post(stack, b'{"repo": "octocat/count-2"}', key=other, content_type="application/vnd.api+json"),
                     post(stack, b'{"repo": "octocat/count-3"}', key=other)]
        assert [r.status_code for r in remaining] == [202, 400, 202, 202]
        assert [int(r.headers["X-RateLimit-Remaining"]) for r in remaining] == [3, 2, 1, 0]
        refused = post(stack, b'{"repo": "octocat/over"}', key=other)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["details"]["limit"] == "4 per 1 minute"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        guesses = [post(stack, b'{"repo": "octocat/x"}', key=f"psk_guess_{i}") for i in range(5)]
        assert [r.status_code for r in guesses][-1] == 429, "a caller with no valid key is limited by its IP too"
        with stack.redis.client() as client:
            stored = [client.hget(key, "repo") for key in client.scan_iter(Keys(stack.env["QUEUE_NAME"]).job("*"))]
        assert "octocat/over" not in stored and {"octocat/count-1", "octocat/count-3"} <= set(stored)
    finally:
        stack.stop()


def test_a_route_added_later_takes_the_same_path(redis_server) -> None:
    app = create_app(Settings.from_env({"REDIS_URL": redis_server.url, "QUEUE_NAME": f"q-rp-{uuid.uuid4().hex[:6]}",
                                        "AUTH_DISABLED": "true", "CORS_ORIGINS": ORIGIN,
                                        "SOCKETIO_ASYNC_MODE": "threading"}))
    app.add_url_rule("/added-later/<name>", "added", lambda name: {"hello": name})
    answer = app.test_client().get("/added-later/x", headers={"Origin": ORIGIN, "X-Request-ID": "later-1"})
    assert answer.status_code == 200 and answer.get_json() == {"hello": "x"}
    assert answer.headers["X-Request-ID"] == "later-1" and answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    body, _ = app.extensions["metrics"].render()
    assert b'route="/added-later/<name>",status="200"' in body, "Flask no longer sets request.url_rule as routed"
