"""X-Hub-Signature-256: HMAC-SHA256 of the raw body, checked against every configured secret."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from pydantic import SecretStr

SIGNATURE_PREFIX = "sha256="


def secret_bytes(secrets: Iterable[str | SecretStr]) -> tuple[bytes, ...]:
    """The configured secrets as bytes, once, so no request decodes them again."""
    out = tuple((s.get_secret_value() if isinstance(s, SecretStr) else s).encode() for s in secrets)
    return tuple(s for s in out if s)


def sign(secret: bytes, body: bytes) -> str:
    """The X-Hub-Signature-256 header value GitHub sends for `body`."""
    return SIGNATURE_PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secrets: tuple[bytes, ...], body: bytes, header: str | None) -> bool:
    """Whether `header` is the signature of `body` with any of `secrets` (secret rotation).

    Every secret is tried even after a match, so the time taken tells nothing about which one
    matched or how much of the signature was right.
    """
    if not header or not header.startswith(SIGNATURE_PREFIX):
        return False
    given = header[len(SIGNATURE_PREFIX) :].encode("ascii", "replace")
    ok = False
    for secret in secrets:
        digest = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
        ok |= hmac.compare_digest(digest, given)
    return ok
