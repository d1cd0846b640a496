"""Provider keys and other secrets: the environment first, then an encrypted store.

The store lives in the database's ``kv`` table (namespace ``"secrets"``), so every
worker on every machine that shares the database shares the secrets; only holders of
the encryption key can read them.

The key comes from ``GOCLAW_ENCRYPTION_KEY``: 32 random bytes (AES-256), encoded as
base64url, with or without the ``=`` padding (43 or 44 characters).
``goclaw secrets keygen`` prints a new one. A missing or malformed key fails closed:
nothing is read or written without it.

Each value is stored as one blob::

    version (1 byte, 0x01) | nonce (12 random bytes) | AES-256-GCM ciphertext + 16-byte tag

with ``version byte + the secret's NAME`` as associated data: a blob copied under
another name, or edited, fails to decrypt instead of yielding a value.

Secrets never go in ``config.yaml``; :class:`goclaw.redact.Scrubber` keeps their values
out of logs, events and model input.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from goclaw.errors import GoclawError
from goclaw.store.database import Database
from goclaw.store.kv import KeyValue

KEY_ENV = "GOCLAW_ENCRYPTION_KEY"
NAMESPACE = "secrets"
VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
NAME_PATTERN = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


class SecretError(GoclawError):
    """A secret could not be used."""


class EncryptionKeyError(SecretError):
    """GOCLAW_ENCRYPTION_KEY is missing or malformed."""


class SecretDecryptError(SecretError):
    """A stored secret could not be decrypted."""


def generate_key() -> str:
    """A new encryption key, in the format ``GOCLAW_ENCRYPTION_KEY`` takes."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode().rstrip("=")


def parse_key(text: str) -> bytes:
    """Decode a base64url key of exactly 32 bytes; padding optional."""
    text = text.strip()
    if not text:
        raise EncryptionKeyError(f"{KEY_ENV} is empty; create one with `goclaw secrets keygen`")
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", text):
        # Never echo the text: it may be a real key with one bad character.
        raise EncryptionKeyError(
            f"{KEY_ENV} is malformed: expected base64url (A-Z a-z 0-9 - _), "
            "e.g. from `goclaw secrets keygen`"
        )
    body = text.rstrip("=")
    try:
        key = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise EncryptionKeyError(f"{KEY_ENV} is malformed: not valid base64url") from None
    if len(key) != KEY_BYTES:
        raise EncryptionKeyError(
            f"{KEY_ENV} is malformed: it decodes to {len(key)} bytes, "
            f"AES-256 needs {KEY_BYTES}; create one with `goclaw secrets keygen`"
        )
    return key


def load_key(env: Mapping[str, str] | None = None) -> bytes:
    """The key from ``GOCLAW_ENCRYPTION_KEY`` in ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    text = env.get(KEY_ENV)
    if text is None:
        raise EncryptionKeyError(
            f"{KEY_ENV} is not set: the secret store needs it "
            "(32 random bytes, base64url; create one with `goclaw secrets keygen`)"
        )
    return parse_key(text)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SecretError(
            f"invalid secret name {name!r}: use 1 to 64 upper-case letters, digits and '_', "
            "starting with a letter (e.g. OPENAI_API_KEY)"
        )
    return name


def _associated_data(name: str) -> bytes:
    return bytes([VERSION]) + name.encode()


class SecretStore:
    """Secrets encrypted with AES-256-GCM in the shared ``kv`` table."""

    def __init__(self, db: Database, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            raise EncryptionKeyError(f"the encryption key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(bytes(key))
        self._kv = KeyValue(db, NAMESPACE)

    @classmethod
    def from_env(cls, db: Database, env: Mapping[str, str] | None = None) -> SecretStore:
        """A store keyed by ``GOCLAW_ENCRYPTION_KEY``; fails closed without a valid one."""
        return cls(db, load_key(env))

    def set(self, name: str, value: str) -> None:
        validate_name(name)
        if not isinstance(value, str) or not value:
            raise SecretError(f"secret {name}: the value is empty")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, value.encode(), _associated_data(name))
        self._kv.put(name, bytes([VERSION]) + nonce + sealed)

    def get(self, name: str) -> str | None:
        """The value, or None when no secret has that name."""
        validate_name(name)
        blob = self._kv.get(name)
        return None if blob is None else self._open(name, blob)

    def names(self) -> list[str]:
        return sorted(self._kv.items())

    def items(self) -> dict[str, str]:
        """Every secret, decrypted (to build a :class:`goclaw.redact.Scrubber`)."""
        return {name: self._open(name, blob) for name, blob in sorted(self._kv.items().items())}

    def remove(self, name: str) -> bool:
        """Delete a secret; False when there was none."""
        validate_name(name)
        return self._kv.delete(name)

    def resolve(self, name: str, env: Mapping[str, str] | None = None) -> str | None:
        """The environment's value when set and non-empty, else the store's, else None."""
        validate_name(name)
        env = os.environ if env is None else env
        value = env.get(name)
        if value:
            return value
        return self.get(name)

    def _open(self, name: str, blob: bytes) -> str:
        if len(blob) < 1 + NONCE_BYTES + TAG_BYTES:
            raise SecretDecryptError(f"secret {name}: the stored value is truncated")
        if blob[0] != VERSION:
            raise SecretDecryptError(
                f"secret {name}: unknown format version {blob[0]} (this goclaw reads {VERSION})"
            )
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            plain = self._aead.decrypt(nonce, sealed, _associated_data(name))
        except InvalidTag:
            raise SecretDecryptError(
                f"secret {name} cannot be decrypted: {KEY_ENV} is not the key it was stored "
                "with, or the stored value was altered or copied from another name"
            ) from None
        try:
            return plain.decode()
        except UnicodeDecodeError:
            raise SecretDecryptError(f"secret {name}: the value is not UTF-8") from None
