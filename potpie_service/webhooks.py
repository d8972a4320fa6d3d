"""Webhooks: check callback URLs, sign deliveries (HMAC-SHA256 over timestamp and body), send them.

Receivers verify `X-Potpie-Signature: sha256=<hex of HMAC(secret, "<timestamp>.<body>")>` and reject a
`X-Potpie-Timestamp` older than a few minutes (replay protection).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
SIGNATURE_HEADER = "X-Potpie-Signature"
TIMESTAMP_HEADER = "X-Potpie-Timestamp"
EVENT_ID_HEADER = "X-Potpie-Event-Id"


class UnsafeCallbackUrl(ValueError):
    """The callback URL is malformed or points at a private, loopback or reserved address."""


def _addresses(host: str, port: int) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror:
        raise UnsafeCallbackUrl(f"callback_url host {host!r} does not resolve") from None


def _is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_global


def check_url(url: str, allow_private: bool) -> str:
    """The URL when it is http(s) and (unless allowed) resolves only to public addresses."""
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        raise UnsafeCallbackUrl(f"callback_url must be a string of at most {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise UnsafeCallbackUrl("callback_url must be an http(s) URL without credentials")
    if not allow_private:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        for address in _addresses(parts.hostname, port):
            if not _is_public(address):
                raise UnsafeCallbackUrl("callback_url points at a private, loopback or reserved address "
                                        "(set WEBHOOK_ALLOW_PRIVATE=true to allow it)")
    return url


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for a delivery."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, tolerance: float = 300) -> bool:
    """Receiver-side check: a valid signature on a recent timestamp."""
    try:
        fresh = abs(time.time() - float(timestamp)) <= tolerance
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


class _PublicPeerOnly:
    """Checks the address actually connected to, before a byte (or a TLS hello) is sent: the URL was
    checked when it was submitted and again before delivery, but the connection resolves the name once
    more, and a DNS answer that changed in between (rebinding) must not reach a private address."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        peer = sock.getpeername()[0]
        if not _is_public(peer):
            sock.close()
            raise UnsafeCallbackUrl("callback_url resolved to a private, loopback or reserved address "
                                    "when connecting")
        return sock


class _PublicHTTPConnection(_PublicPeerOnly, HTTPConnection):
    pass


class _PublicHTTPSConnection(_PublicPeerOnly, HTTPSConnection):
    pass


class _PublicHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PublicHTTPConnection


class _PublicHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PublicHTTPSConnection


class _PublicOnlyAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PublicHTTPPool, "https": _PublicHTTPSPool}


def _session(allow_private: bool) -> requests.Session:
    session = requests.Session()
    if not allow_private:
        # no proxy: a proxy would resolve the name itself, out of reach of the check above
        session.trust_env = False
        for scheme in ("http://", "https://"):
            session.mount(scheme, _PublicOnlyAdapter())
    return session


def deliver(url: str, event: str, payload: dict[str, Any], secret: str, allow_private: bool, event_id: str,
            timeout: float = 10.0) -> int:
    """POST the event once; return the HTTP status, raise on a network error or a non-2xx answer. `event_id`
    (`job_id:seq`) is the same on every attempt and after a Redis failover: a receiver drops what it has seen."""
    check_url(url, allow_private)  # again at delivery: DNS may have changed since the job was submitted
    body = json.dumps({"event": event, "event_id": event_id, **payload}, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "potpie-service-webhook/1",
               TIMESTAMP_HEADER: timestamp, "X-Potpie-Event": event, EVENT_ID_HEADER: event_id,
               "X-Potpie-Delivery": uuid.uuid4().hex}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
    with _session(allow_private) as session:
        response = session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    if not 200 <= response.status_code < 300:
        raise requests.HTTPError(f"webhook answered {response.status_code}")
    return response.status_code
