"""GitHub tokens at rest: encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under TOKEN_ENCRYPTION_KEY."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken


def new_key() -> str:
    """A fresh TOKEN_ENCRYPTION_KEY value."""
    return Fernet.generate_key().decode()


def valid_key(key: str) -> bool:
    """Whether `key` is a usable Fernet key."""
    try:
        Fernet(key.encode())
    except (ValueError, TypeError):
        return False
    return True


class TokenCipher:
    """Encrypts tokens for the job store and decrypts them in the worker."""

    def __init__(self, key: str) -> None:
        self._fernet = Fernet(key.encode()) if key else None

    @property
    def enabled(self) -> bool:
        """Whether a key is configured (without one, tokens are refused)."""
        return self._fernet is not None

    def encrypt(self, token: str) -> str:
        """The token, encrypted and authenticated."""
        if self._fernet is None:
            raise RuntimeError("TOKEN_ENCRYPTION_KEY is not set")
        return self._fernet.encrypt(token.encode()).decode()

    def decrypt(self, sealed: str | None) -> str | None:
        """The token, or None when missing, tampered with or sealed under another key."""
        if not sealed or self._fernet is None:
            return None
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            return None
