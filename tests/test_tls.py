"""Redis over TLS: a real redis-server with certificates made here, a full job through API + worker over rediss://
(store, broker, Socket.IO queue and rate limiter), client certificates (mTLS), and an untrusted server refused."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import requests
import socketio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from redis.backoff import NoBackoff
from redis.retry import Retry

from potpie_service.auth import new_key
from tests.stack import ARTIFACTS, ROOT, RedisServer, Service, free_port, service_env, start_api, wait_for

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

ALICE, ALICE_ENTRY = new_key("alice")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    """A self-signed CA certificate and key; returns the cert, key and the cert's PEM path."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def issue(directory: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path], name: str,
          server: bool) -> tuple[Path, Path]:
    """A leaf certificate signed by `ca` (server: for 127.0.0.1 and localhost); returns (cert, key) paths."""
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@dataclass
class Pki:
    """Certificates for one test run: the real CA, a client cert, and an unrelated CA."""

    ca: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path


class TlsRedis(RedisServer):
    """redis-server listening only on a TLS port, requiring client certificates signed by the CA."""

    def __init__(self, pki: Pki, server_cert: Path, server_key: Path) -> None:
        super().__init__(extra=["--port", "0", "--tls-cert-file", str(server_cert), "--tls-key-file", str(server_key),
                                "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "yes"])
        self.pki = pki
        self.extra += ["--tls-port", str(self.port)]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5, ssl_ca_certs=str(self.pki.ca),
                                    ssl_certfile=str(self.pki.client_cert), ssl_keyfile=str(self.pki.client_key))


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    directory = Path(tempfile.mkdtemp(prefix="psvc-tls-"))
    ca = make_ca(directory, "test-ca")
    server_cert, server_key = issue(directory, ca, "redis-server", server=True)
    client_cert, client_key = issue(directory, ca, "psvc-client", server=False)
    wrong = make_ca(directory, "wrong-ca")
    server = TlsRedis(Pki(ca[2], client_cert, client_key, wrong[2]), server_cert, server_key).start()
    yield server
    server.cleanup()


def tls_env(server: TlsRedis, simulator_url: str, **overrides: str) -> dict[str, str]:
    pki = server.pki
    tls = {"REDIS_TLS_CA_PATH": str(pki.ca), "REDIS_TLS_CERT_PATH": str(pki.client_cert),
           "REDIS_TLS_KEY_PATH": str(pki.client_key)}
    return service_env(server.url, simulator_url, QUEUE_NAME=f"q-tls-{uuid.uuid4().hex[:6]}", AUTH_DISABLED="false",
                       API_KEYS=ALICE_ENTRY, **{**tls, **overrides})


def start_tls_worker(env: dict[str, str], server: TlsRedis, name: str) -> Service:
    """A Celery worker on the TLS broker; returns once it consumed its own heartbeat (read over TLS too)."""
    hostname = f"{name}-{free_port()}@localhost"
    worker = Service(name, [sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=INFO", "-E",
                            f"--hostname={hostname}", "--without-gossip", "--without-mingle"],
                     env).start()
    key = f"psvc:{env['QUEUE_NAME']}:workers"
    wait_for(lambda: server.client().zscore(key, hostname) or not worker.alive(), 30, what="the TLS worker heartbeat")
    assert worker.alive(), worker.log()[-3000:]
    return worker


def test_plaintext_is_refused_and_tls_needs_a_client_certificate(tls_redis: TlsRedis) -> None:
    once = {"socket_timeout": 0.3, "retry": Retry(NoBackoff(), 0)}
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        redis.Redis(port=tls_redis.port, **once).ping()
    with pytest.raises(redis.ConnectionError):  # verified server, but no client certificate
        redis.Redis.from_url(tls_redis.url, ssl_ca_certs=str(tls_redis.pki.ca), **once).ping()
    assert tls_redis.client().ping()


def test_full_job_over_tls_with_ca_verification_and_client_certificate(tls_redis: TlsRedis, simulator) -> None:
    env = tls_env(tls_redis, simulator.url, RATE_LIMIT="100/minute")
    worker = start_tls_worker(env, tls_redis, "tls-worker")
    api = start_api(env, "tls-api")
    events: list[tuple[str, Any]] = []
    done = threading.Event()
    client = socketio.Client()
    client.on("*", lambda name, data: (events.append((name, data)), name == "analysis_complete" and done.set()))
    try:
        client.connect(api.url, transports=["websocket"], auth={"token": ALICE}, wait_timeout=5)  # type: ignore
        headers = {"Authorization": f"Bearer {ALICE}"}
        accepted = requests.post(api.url + "/analyze", json={"repo": "octocat/tls"}, headers=headers,  # type: ignore
                                 timeout=5)
        assert accepted.status_code == 202, accepted.text
        assert tls_redis.client().keys(f"psvc:{env['QUEUE_NAME']}:ratelimit*"), "the limiter counts in TLS Redis"
        job_id = accepted.json()["job_id"]
        assert client.call("join_project", job_id, timeout=5)["ok"] is True
        assert done.wait(30), events
        names = [name for name, _ in events]
        assert names.count("analysis_complete") == 1 and "status_update" in names
        assert any(data.get("status") == "parsing" for name, data in events if name == "status_update"), \
            "live progress came from the worker through the Socket.IO queue on TLS Redis"
        status = requests.get(f"{api.url}/status/{job_id}", headers=headers, timeout=5).json()  # type: ignore
        assert status["status"] == "finished" and status["result"]["repo"] == "octocat/tls"
        health = requests.get(api.url + "/health", headers=headers, timeout=5).json()  # type: ignore
        assert health["checks"]["redis"]["status"] == "up" and health["checks"]["workers"]["status"] == "up"
        assert tls_redis.client().hget(f"psvc:{env['QUEUE_NAME']}:job:{job_id}", "status") == "finished"
    finally:
        client.disconnect()
        api.stop()
        worker.stop()


def _run_api(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potpie_service", "api"], cwd=ROOT,
                          env={**env, "PORT": str(free_port()), "HOST": "127.0.0.1"}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("change, expected", [
    ({"REDIS_TLS_CA_PATH": "wrong"}, "CERTIFICATE_VERIFY_FAILED"),
    ({"REDIS_TLS_CERT_PATH": "", "REDIS_TLS_KEY_PATH": ""}, "TLS handshake with Redis"),
], ids=["untrusted-server", "no-client-certificate"])
def test_api_refuses_an_untrusted_redis_at_once_with_a_clear_message(tls_redis: TlsRedis, simulator,
                                                                    change: dict[str, str], expected: str) -> None:
    if change.get("REDIS_TLS_CA_PATH") == "wrong":
        change = {"REDIS_TLS_CA_PATH": str(tls_redis.pki.wrong_ca)}
    started = time.monotonic()
    done = _run_api(tls_env(tls_redis, simulator.url, **change))
    assert done.returncode == 2, done.stderr[-3000:]
    assert time.monotonic() - started < 15, "no hang"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("potpie-service api: TLS handshake with Redis at 127.0.0.1:") and expected in last, last
    assert "REDIS_TLS_CA_PATH" in last and "Traceback" not in done.stderr


def test_unverified_tls_only_when_explicit_and_warned(tls_redis: TlsRedis, simulator) -> None:
    name = "tls-api-unverified"
    (ARTIFACTS / f"{name}.log").unlink(missing_ok=True)
    env = tls_env(tls_redis, simulator.url, REDIS_TLS_CA_PATH=str(tls_redis.pki.wrong_ca),
                  REDIS_TLS_REJECT_UNAUTHORIZED="false")
    api = start_api(env, name)
    try:
        health = requests.get(api.url + "/health", headers={"X-API-Key": ALICE}, timeout=5)  # type: ignore
        assert health.json()["checks"]["redis"]["status"] == "up", "connected without verifying the server"
        log = api.log()
        assert "REDIS_TLS_REJECT_UNAUTHORIZED=false" in log and "NOT verified" in log
        assert log.count("certificate is NOT verified") == 1, "warned once, not per connection"
    finally:
        api.stop()


def test_worker_with_an_untrusted_redis_says_why(tls_redis: TlsRedis, simulator) -> None:
    env = tls_env(tls_redis, simulator.url, REDIS_TLS_CA_PATH=str(tls_redis.pki.wrong_ca))
    name = "tls-worker-untrusted"
    (ARTIFACTS / f"{name}.log").unlink(missing_ok=True)
    worker = Service(name, [sys.executable, "-m", "celery", "-A", "workers", "worker",
                            f"--hostname={name}@localhost", "--without-gossip", "--without-mingle"], env).start()
    try:
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in worker.log(), 15, what="the worker to report the bad CA")
    finally:
        worker.stop(timeout=10)
    assert os.path.exists(worker.log_path)
