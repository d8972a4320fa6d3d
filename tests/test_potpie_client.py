"""The Potpie client against the simulator over real HTTP: routes, reply forms, error classes, retries."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from potpie_service.potpie.client import (PermanentPotpieError, PotpieClient, Response, TransientPotpieError, check,
                                   parse_stream)
from tests.conftest import SIM_KEY
from tests.stack import free_port


def client(url: str, **kwargs: object) -> PotpieClient:
    return PotpieClient(url, kwargs.pop("key", SIM_KEY), kwargs.pop("timeout", 2.0), **kwargs)  # type: ignore[arg-type]


def test_full_conversation_in_both_reply_forms(simulator) -> None:
    streamed, whole = client(simulator.url, stream=True), client(simulator.url, stream=False)
    project_id, status = streamed.submit_parse("octocat/client", "dev")
    assert status == "submitted"
    found_id, found_status = streamed.find_project("octocat/client", "dev")
    assert found_id == project_id and found_status in ("submitted", "cloned", "parsed", "inferring", "ready")
    assert streamed.find_project("octocat/never-parsed", "main") is None
    deadline = time.monotonic() + 5
    while streamed.parse_status(project_id) != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conversation = streamed.create_conversation(project_id)
    a = streamed.send_message(conversation, "What is it?")
    b = whole.send_message(conversation, "What is it?")
    assert a.text == b.text and "octocat/client" in a.text and a.citations == b.citations == ["src/app.py",
                                                                                              "src/service.py"]


def test_errors_are_classified(simulator) -> None:
    with pytest.raises(PermanentPotpieError) as info:
        client(simulator.url, key="sk-wrong").submit_parse("octocat/x", "main")
    assert info.value.status == 401 and "POTPIE_API_KEY" in info.value.reason
    project_id, _ = client(simulator.url).submit_parse("usage-limit/client", "main")
    with pytest.raises(PermanentPotpieError, match="usage limit reached \\(402\\)"):
        client(simulator.url).create_conversation(project_id)
    with pytest.raises(PermanentPotpieError) as missing:
        client(simulator.url).parse_status("no-such-project")
    assert missing.value.status == 404


def test_transient_failures_retry_then_give_up_fast(simulator) -> None:
    flaky = client(simulator.url)
    assert flaky.submit_parse("flaky/client", "main")[1] == "submitted"  # 503 once, then fine
    with pytest.raises(TransientPotpieError, match="server error \\(500\\)"):
        client(simulator.url, attempts=2).submit_parse("server-error/client", "main")
    started = time.monotonic()
    with pytest.raises(TransientPotpieError, match="cannot reach Potpie"):
        client(f"http://127.0.0.1:{free_port()}", attempts=2).submit_parse("octocat/x", "main")
    assert time.monotonic() - started < 3


def test_429_retry_after_is_honoured(simulator) -> None:
    started = time.monotonic()
    client(simulator.url).submit_parse("rate-limited/client", "main")
    assert time.monotonic() - started >= 0.95  # Retry-After: 1


def test_check_and_stream_parsing_without_a_server() -> None:
    def response(status: int, body: bytes = b"{}", headers: dict | None = None) -> Response:
        return Response(status, body, headers or {})

    with pytest.raises(TransientPotpieError) as limited:
        check(response(429, b'{"detail": "slow down"}', {"Retry-After": "7"}))
    assert limited.value.retry_after == 7.0
    for status in (500, 502, 503, 504):
        with pytest.raises(TransientPotpieError):
            check(response(status))
    for status in (400, 401, 402, 403, 404, 422):
        with pytest.raises(PermanentPotpieError):
            check(response(status))
    check(response(200))
    reply = parse_stream('{"message": "Hel", "citations": []}{"message": "lo", "citations": ["a.py"]}\n')
    assert reply.text == "Hello" and reply.citations == ["a.py"]
    with pytest.raises(TransientPotpieError, match="mid-message"):
        parse_stream('{"message": "Hel"}{"message": "l')


def test_proxy_variables_are_read_once_and_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY and NO_PROXY apply as requests applies them, read when the client is built (not per call)."""
    seen: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)  # a proxy gets the absolute URL
            body = json.dumps({"status": "ready"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setenv("NO_PROXY", "bypassed.invalid")
        proxied = client("http://potpie.invalid")
        bypassed = client("http://bypassed.invalid", attempts=1)
        monkeypatch.delenv("HTTP_PROXY")  # read at construction: later changes do not matter
        assert proxied.parse_status("p1") == "ready"
        assert seen == ["http://potpie.invalid/api/v2/parsing-status/p1"]
        with pytest.raises(TransientPotpieError, match="cannot reach Potpie"):
            bypassed.parse_status("p1")  # direct: the name does not resolve
        assert len(seen) == 1
    finally:
        proxy.shutdown()
        proxy.server_close()
