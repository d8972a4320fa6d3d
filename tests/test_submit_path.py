"""The submit path in front of Flask (api/submit_path.py), over HTTP against a real API process and Redis: a submit
it answers looks like one the Flask view answers (body, headers, rate-limit count), its refusals keep the app's
shape, and every request it hands on reaches the view whole and is counted once."""

from __future__ import annotations

import uuid
from typing import Iterator

import flask
import pytest
import requests

from potpie_service.api import create_app
from potpie_service.auth import new_key
from potpie_service.config import Settings
from potpie_service.store.keys import Keys
from tests.conftest import Stack, make_stack

KEY, ENTRY = new_key("carol")
ORIGIN = "https://app.example"
TAKEN = "application/json"  # the layer answers these
HANDED_ON = "application/vnd.api+json"  # JSON to Flask's view too, but not a type the layer takes


@pytest.fixture(scope="module")
def lean(redis_server, simulator) -> Iterator[Stack]:
    running = make_stack(redis_server, simulator, "lean", workers=0, AUTH_DISABLED="false", API_KEYS=ENTRY,
                         RATE_LIMIT="8/minute", CORS_ORIGINS=ORIGIN, DEDUP_ENABLED="false")
    yield running
    running.stop()


def post(stack: Stack, body: bytes, content_type: str = TAKEN, key: str = KEY,
         request_id: str | None = None) -> requests.Response:
    headers = {"Content-Type": content_type, "X-API-Key": key, "Origin": ORIGIN}
    return requests.post(stack.url + "/analyze", data=body, timeout=5,
                         headers={**headers, "X-Request-ID": request_id} if request_id else headers)


def test_a_submit_answered_before_flask_matches_the_views_answer(lean: Stack) -> None:
    fast = post(lean, b'{"repo": "octocat/lean-a"}', request_id="lean-req-1")
    view = post(lean, b'{"repo": "octocat/lean-b"}', content_type=HANDED_ON)
    assert fast.status_code == view.status_code == 202
    assert list(fast.json()) == list(view.json()) and fast.json()["status"] == "queued"
    assert fast.headers["Content-Type"] == view.headers["Content-Type"] == "application/json"
    assert fast.headers["X-Request-ID"] == "lean-req-1" and len(view.headers["X-Request-ID"]) == 32
    skip = {"date", "content-length", "x-request-id", "x-ratelimit-remaining"}
    assert {k.lower(): v for k, v in fast.headers.items() if k.lower() not in skip} == \
        {k.lower(): v for k, v in view.headers.items() if k.lower() not in skip}
    assert fast.headers["Access-Control-Allow-Origin"] == ORIGIN and fast.headers["X-Frame-Options"] == "DENY"
    assert int(fast.headers["X-RateLimit-Remaining"]) == int(view.headers["X-RateLimit-Remaining"]) + 1
    with lean.redis.client() as client:
        assert client.hget(Keys(lean.env["QUEUE_NAME"]).job(fast.json()["job_id"]), "repo") == "octocat/lean-a"


@pytest.mark.parametrize("body, key, status, field", [
    (b'{"repo": "octocat/x", "colour": "red"}', KEY, 400, "colour"),  # read by the layer, refused by the view
    (b'{"repo": "not a repo"}', KEY, 400, "repo"),
    (b'{"repo": ', KEY, 400, "body"),
    (b'{"repo": "octocat/x"}', "psk_not_a_key", 401, None),
])
def test_a_request_the_layer_does_not_take_reaches_the_view_whole(lean: Stack, body: bytes, key: str, status: int,
                                                                   field: str | None) -> None:
    answer = post(lean, body, key=key)
    assert answer.status_code == status and answer.json()["success"] is False
    if field:
        assert answer.json()["details"]["field"] == field
    assert answer.headers["X-Frame-Options"] == "DENY" and "X-Request-ID" in answer.headers


def test_counted_once_whichever_answers_and_refused_over_the_limit_with_nothing_stored(lean: Stack) -> None:
    other, entry = new_key("dave")  # a budget of its own: the stack's first key has spent some of its 8
    stack = make_stack(lean.redis, lean.simulator, "lean-limit", workers=0, AUTH_DISABLED="false",
                       API_KEYS=entry, RATE_LIMIT="4/minute", DEDUP_ENABLED="false")
    try:
        remaining = [post(stack, b'{"repo": "octocat/count-1"}', key=other),
                     post(stack, b'{"repo": "octocat/x", "colour": "red"}', key=other),  # handed on, a 400
                     post(stack, b'{"repo": "octocat/count-2"}', key=other, content_type=HANDED_ON),
                     post(stack, b'{"repo": "octocat/count-3"}', key=other)]
        assert [r.status_code for r in remaining] == [202, 400, 202, 202]
        assert [int(r.headers["X-RateLimit-Remaining"]) for r in remaining] == [3, 2, 1, 0]
        refused = post(stack, b'{"repo": "octocat/over"}', key=other)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["details"]["limit"] == "4 per 1 minute"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        with stack.redis.client() as client:
            stored = [client.hget(key, "repo") for key in client.scan_iter(Keys(stack.env["QUEUE_NAME"]).job("*"))]
        assert "octocat/over" not in stored and {"octocat/count-1", "octocat/count-3"} <= set(stored)
    finally:
        stack.stop()


def test_the_layer_answers_a_well_formed_submit_and_hands_the_view_the_rest(redis_server) -> None:
    """In-process, the view swapped for a marker: a 202 with the marker absent was the layer's; a refusal the
    layer does not write reaches the view with the body it was sent."""
    app = create_app(Settings.from_env({"REDIS_URL": redis_server.url, "QUEUE_NAME": f"q-lean-{uuid.uuid4().hex[:6]}",
                                        "AUTH_DISABLED": "false", "API_KEYS": ENTRY, "DEDUP_ENABLED": "false",
                                        "SOCKETIO_ASYNC_MODE": "threading"}))
    seen: list[bytes] = []

    def marker() -> tuple[str, int]:
        seen.append(flask.request.get_data())
        return "the view", 299

    app.view_functions["api.analyze"] = marker
    client = app.test_client()
    taken = client.post("/analyze", data=b'{"repo": "octocat/lean-c"}',
                        headers={"Content-Type": TAKEN, "X-API-Key": KEY})
    assert taken.status_code == 202 and taken.get_json()["status"] == "queued" and seen == []
    for body, content_type, key in [(b'{"repo": "octocat/x", "colour": "red"}', TAKEN, KEY),
                                    (b'{"repo": "octocat/y"}', HANDED_ON, KEY),
                                    (b'{"repo": "octocat/z"}', TAKEN, "nope")]:
        handed = client.post("/analyze", data=body, headers={"Content-Type": content_type, "X-API-Key": key})
        assert handed.status_code == 299 and seen[-1] == body
    assert len(seen) == 3
