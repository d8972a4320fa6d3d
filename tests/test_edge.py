"""The HTTP edge (api/edge.py) against a real API process: every body is read within REQUEST_BODY_TIMEOUT (408),
within its route's limit (413, before it is read), with framing mistakes answered 400; headers are capped in all
(431); a Socket.IO polling body engine.io cannot decode is a 400; the method label of the HTTP metrics is bounded.
Raw sockets send what no HTTP library would; nothing here may leave a traceback or a 5xx in the API's log."""

from __future__ import annotations

import os
import socket
import time
from typing import Iterator

import pytest
import requests

from tests.hostile import (ALICE, Process, body_of, connect, metric, polling_sid, read_until_closed, refusals,
                           status_of)
from tests.stack import Service

SECURITY = b"X-Content-Type-Options: nosniff"


@pytest.fixture
def api(guarded_api: Service) -> Iterator[Service]:
    """The guarded API; after the test, its log holds no traceback and no 5xx from it."""
    process = Process(guarded_api)
    yield guarded_api
    process.check_log()


def _stalled(api: Service, request: bytes) -> tuple[bytes, float, bool]:
    """Send a request whose body stops short; the answer, when it came and whether the connection was closed."""
    with connect(api) as sock:
        started = time.monotonic()
        sock.sendall(request)
        answer, closed = read_until_closed(sock, limit=10)
        return answer, time.monotonic() - started, closed


@pytest.mark.parametrize("keyless_polling", [False, True], ids=["analyze-with-a-key", "socketio-polling-keyless"])
def test_a_body_that_stops_arriving_gets_408_after_the_body_timeout(api: Service, keyless_polling: bool) -> None:
    before = refusals(api, "body_timeout")
    if keyless_polling:
        head = f"POST /socket.io/?EIO=4&transport=polling&sid={polling_sid(api)} HTTP/1.1\r\nContent-Type: text/plain"
    else:
        head = f"POST /analyze HTTP/1.1\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json"
    answer, took, closed = _stalled(api, f"{head}\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"repo".encode())
    assert status_of(answer) == 408, answer
    assert 0.9 <= took <= 2.5, f"408 after {took:.2f} s (REQUEST_BODY_TIMEOUT=1)"
    assert closed, "the connection is closed after the 408"
    assert body_of(answer) == {"success": False, "error": "the body did not arrive within 1 s",
                               "details": {"field": "body"}}
    assert SECURITY in answer
    assert refusals(api, "body_timeout") == before + 1


def test_an_oversized_socketio_polling_body_is_413_before_it_is_read(api: Service) -> None:
    sid = polling_sid(api)
    with connect(api) as sock:
        started = time.monotonic()
        sock.sendall(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: text/plain\r\nContent-Length: 50000000\r\n\r\n".encode() + b"4" * 65536)
        answer, closed = read_until_closed(sock, limit=5)
    assert status_of(answer) == 413, answer
    assert time.monotonic() - started < 1, "answered without waiting for the body"
    assert closed
    assert body_of(answer)["details"] == {"field": "body"} and b"65536 bytes" in answer


@pytest.mark.parametrize("parts, status", [([b"3"], 200), ([b"4" * 35_000] * 2, 413)],
                         ids=["a-pong", "over-the-limit"])
def test_a_chunked_socketio_polling_body_is_read_up_to_its_limit(api: Service, parts: list[bytes],
                                                                 status: int) -> None:
    sid = polling_sid(api)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    with connect(api) as sock:
        sock.sendall(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
                     + chunks)
        answer, _ = read_until_closed(sock, limit=5)
    assert status_of(answer) == status, answer


@pytest.mark.parametrize("body, reason", [
    (b"4\xff\xfe", "not UTF-8"), (b"x", "not a packet type"), (b"\x1e".join([b"2"] * 17), "17 packets"),
    (b"bAAA!", "bad base64"),
], ids=["invalid-utf8", "bad-type", "too-many-packets", "bad-base64"])
def test_a_polling_body_engineio_cannot_decode_is_400(api: Service, body: bytes, reason: str) -> None:
    sid = polling_sid(api)
    answer = requests.post(f"{api.url}/socket.io/?EIO=4&transport=polling&sid={sid}", data=body,  # type: ignore[attr-defined]
                           headers={"Content-Type": "text/plain"}, timeout=5)
    assert answer.status_code == 400, (reason, answer.text)
    assert answer.json()["details"] == {"field": "body"}


def test_a_bad_chunk_size_is_400_not_500(api: Service) -> None:
    with connect(api) as sock:
        sock.sendall(f"POST /analyze HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                     + b"zz\r\n{}\r\n0\r\n\r\n")
        answer, closed = read_until_closed(sock, limit=5)
    assert status_of(answer) == 400, answer
    assert body_of(answer) == {"success": False, "error": "malformed body: InvalidChunkSize",
                               "details": {"field": "body"}}
    assert closed


def test_a_body_cut_short_is_400(api: Service) -> None:
    with connect(api) as sock:
        sock.sendall(f"POST /analyze HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}".encode())
        sock.shutdown(socket.SHUT_WR)
        answer, _ = read_until_closed(sock, limit=5)
    assert status_of(answer) == 400, answer
    assert body_of(answer)["error"] == "the body ended before its Content-Length", "said at the edge"


@pytest.mark.parametrize("path", ["/livez", "/socket.io/?EIO=4&transport=polling"])
def test_headers_over_the_total_are_431(api: Service, path: str) -> None:
    """Three headers of 6 KB each: every one within gunicorn's 8190 bytes, 18 KB in all."""
    headers = {f"X-Pad-{i}": "p" * 6000 for i in range(3)}
    answer = requests.get(api.url + path, headers=headers, timeout=5)  # type: ignore[attr-defined]
    assert answer.status_code == 431, answer.text
    assert answer.json()["details"] == {"field": "headers"}
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert requests.get(api.url + path, headers={"X-Pad": "p" * 6000}, timeout=5).status_code == 200  # type: ignore[attr-defined]


def test_more_header_fields_than_the_limit_are_431(api: Service) -> None:
    """REQUEST_HEADER_FIELDS_MAX (50, gunicorn's limit_request_fields): 60 small headers, 1 KB in all."""
    headers = {f"X-F{i}": "v" for i in range(60)}
    answer = requests.get(api.url + "/livez", headers=headers, timeout=5)  # type: ignore[attr-defined]
    assert answer.status_code == 431, answer.text
    assert answer.json()["details"] == {"field": "headers"}
    assert requests.get(api.url + "/livez", headers=dict(list(headers.items())[:40]), timeout=5).status_code == 200  # type: ignore[attr-defined]


def test_methods_a_client_makes_up_share_one_metric_series(api: Service) -> None:
    series = 'potpie_http_request_duration_seconds_count{method="other",route="unmatched",status="405"}'
    requests.request("XFIRST", api.url + "/livez", timeout=5)  # type: ignore[attr-defined]  # the series exists
    before = metric(api, series)
    made_up = [f"X{os.urandom(4).hex().upper()}" for _ in range(30)]
    with requests.Session() as session:
        for method in made_up:
            assert session.request(method, api.url + "/livez", timeout=5).status_code == 405  # type: ignore[attr-defined]
    text = requests.get(api.url + "/metrics", headers={"Authorization": f"Bearer {ALICE}"}, timeout=5).text  # type: ignore[attr-defined]
    assert metric(api, series) == before + len(made_up)
    assert not [method for method in made_up if method in text]
