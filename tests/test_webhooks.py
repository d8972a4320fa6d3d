"""Webhook delivery refuses a private peer at connect time, whatever the earlier DNS checks saw."""

from __future__ import annotations

import socket
import threading

import pytest
import requests

from potpie_service import webhooks
from tests.stack import Receiver

PUBLIC = "93.184.216.34"  # what a rebinding name answers first: a public address


@pytest.fixture
def receiver():
    endpoint = Receiver()
    yield endpoint
    endpoint.close()


@pytest.fixture
def rebinding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The submit- and delivery-time checks see a public address; the connection then reaches loopback."""
    monkeypatch.setattr(webhooks, "_addresses", lambda host, port: {PUBLIC})


def test_a_name_rebound_to_loopback_after_the_check_is_refused_at_connect(receiver, rebinding) -> None:
    url = receiver.url
    assert webhooks.check_url(url, allow_private=False) == url  # the name-based check is fooled
    with pytest.raises(webhooks.UnsafeCallbackUrl, match="when connecting"):
        webhooks.deliver(url, "analysis_complete", {"job_id": "j1"}, "secret", allow_private=False, event_id="j1:7")
    assert receiver.calls == []


def test_the_same_delivery_goes_through_when_private_addresses_are_allowed(receiver, rebinding) -> None:
    assert webhooks.deliver(receiver.url, "analysis_complete", {"job_id": "j1"}, "secret", allow_private=True,
                            event_id="j1:7") == 204
    assert len(receiver.calls) == 1 and b'"job_id":"j1"' in receiver.calls[0][1]


def test_https_is_refused_before_the_tls_hello(rebinding) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    received: list[bytes] = []

    def accept() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        received.append(conn.recv(1024))  # b"" once the client closes without sending
        conn.close()

    thread = threading.Thread(target=accept)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/hook"
    try:
        with pytest.raises(webhooks.UnsafeCallbackUrl):
            webhooks.deliver(url, "analysis_complete", {"job_id": "j1"}, "secret", allow_private=False,
                             event_id="j1:7")
        thread.join(6)
    finally:
        listener.close()
    assert received == [b""], "not a byte, not even a ClientHello, reached the private peer"


def test_proxy_settings_are_not_followed_when_private_addresses_are_refused(
        receiver, rebinding, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy would resolve the name itself, out of reach of the check: deliveries go direct."""
    monkeypatch.setenv("HTTP_PROXY", receiver.url.rsplit("/", 1)[0])  # the receiver as a "proxy" on loopback
    monkeypatch.setenv("NO_PROXY", "")
    target = f"http://{PUBLIC}:9/hook"
    with pytest.raises(requests.RequestException):  # direct to an address unreachable from here
        webhooks.deliver(target, "analysis_complete", {"job_id": "j1"}, "", allow_private=False, event_id="j1:7",
                         timeout=1)
    assert receiver.calls == [], "the proxy (the receiver) was not used"
