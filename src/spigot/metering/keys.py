"""API key secrets: how they are made, stored (as a hash) and shown (as a prefix)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_PREFIX = "sk-spigot-"
DISPLAY_CHARS = 14


def new_secret() -> str:
    """A fresh key: 256 random bits after a recognisable prefix (secret scanners can match it)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What the store keeps instead of the secret.

    A fast hash is right here: the secrets are 256 random bits, so there is nothing to
    brute-force that a slow password hash (and a per-key salt) would protect.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def key_prefix(secret: str) -> str:
    """The part of a secret that may be shown again (``sk-spigot-AbCd``): enough to tell keys
    apart, far too little to guess the rest."""
    return secret[:DISPLAY_CHARS]


def hashes_match(stored: str, presented: str) -> bool:
    # Constant-time, so a lookup's timing says nothing about how much of a hash matched.
    return hmac.compare_digest(stored.encode("ascii"), presented.encode("ascii"))
