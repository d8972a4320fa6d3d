"""Who is calling: service API keys (stored as SHA-256 hashes, each with a name) compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

ANONYMOUS = "anonymous"
OWNER_NAME = r"[A-Za-z0-9._@-]{1,64}"
_ENTRY = re.compile(rf"{OWNER_NAME}:[0-9a-fA-F]{{64}}")


def hash_key(key: str) -> str:
    """The SHA-256 hex digest stored in API_KEYS for a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(authorization: str, api_key: str | None) -> str | None:
    """The API key a request presents: `Authorization: Bearer <key>`, else `X-API-Key`."""
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return api_key


def new_key(name: str) -> tuple[str, str]:
    """A new client key and its API_KEYS entry `name:hash`; ValueError for a name API_KEYS cannot hold."""
    if not re.fullmatch(OWNER_NAME, name):
        raise ValueError("the name must be 1-64 letters, digits or . _ @ -")
    key = "psk_" + secrets.token_urlsafe(32)
    return key, f"{name}:{hash_key(key)}"


def bad_entries(entries: tuple[str, ...]) -> list[str]:
    """The owner names (or '?') of API_KEYS / OPS_API_KEYS entries that are not `name:sha256hex`."""
    return [entry.rpartition(":")[0][:64] or "?" for entry in entries if not _ENTRY.fullmatch(entry)]


def missing_keys_problem(api_keys: tuple[str, ...], disabled: bool) -> str | None:
    """Why an API must not start without client keys (None when it may)."""
    if api_keys or disabled:
        return None
    return ("API_KEYS is empty: set API_KEYS (see `python -m potpie_service keygen`) "
            "or AUTH_DISABLED=true for local development")


def _parse(entries: tuple[str, ...]) -> list[tuple[str, str]]:
    if bad_entries(entries):
        raise ValueError(f"API key entries are not 'name:sha256hex': {', '.join(bad_entries(entries))}")
    return [(name, digest.lower()) for name, _, digest in (entry.rpartition(":") for entry in entries)]


class Authenticator:
    """Maps a presented key to its owner name."""

    def __init__(self, api_keys: tuple[str, ...], ops_keys: tuple[str, ...] = (), disabled: bool = False) -> None:
        self.disabled = disabled
        self.clients = _parse(api_keys)
        self.ops = _parse(ops_keys)

    @staticmethod
    def _match(key: str | None, table: list[tuple[str, str]]) -> str | None:
        if not key:
            return None
        digest = hash_key(key)
        found = None
        for name, expected in table:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(digest, expected):
                found = name
        return found

    def owner(self, key: str | None) -> str | None:
        """The owner name for a client key (ANONYMOUS when auth is disabled), else None."""
        if self.disabled:
            return ANONYMOUS
        return self._match(key, self.clients)

    def operator(self, key: str | None) -> bool:
        """Whether the key may read operational details (/health details, /queue/stats)."""
        return self.disabled or self._match(key, self.ops) is not None or self.owner(key) is not None
