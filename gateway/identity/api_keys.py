"""API key format: generation, hashing and a cheap syntactic check.

A key is ``cg_`` followed by 43 characters of unpadded urlsafe base64 encoding 32 random
bytes (256 bits). Only its SHA-256 is stored; the plaintext is shown once, at creation.
Key ids (``key_`` + 16 hex) are printable handles that are safe to log and to revoke by.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

KEY_PREFIX = "cg_"
KEY_LENGTH = len(KEY_PREFIX) + 43
DISPLAY_PREFIX_LENGTH = 10

_KEY_RE = re.compile(r"cg_[A-Za-z0-9_-]{43}")


def generate_api_key() -> str:
    """Return a new random API key (``cg_`` + 43 urlsafe base64 characters)."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return KEY_PREFIX + body


def new_key_id() -> str:
    """Return a new key id: ``key_`` + 16 hex characters."""
    return "key_" + secrets.token_hex(8)


def hash_api_key(key: str) -> bytes:
    """Return the SHA-256 digest of ``key`` (what is stored and looked up)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def looks_like_api_key(s: str) -> bool:
    """Cheap syntactic check (prefix, length, charset), to skip lookups of obvious junk."""
    return len(s) == KEY_LENGTH and _KEY_RE.fullmatch(s) is not None


def display_prefix(key: str) -> str:
    """The first characters of a key, stored so humans can tell keys apart."""
    return key[:DISPLAY_PREFIX_LENGTH]
