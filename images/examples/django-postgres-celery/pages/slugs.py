"""Turning a page title into the slug its URL uses."""

import re
import unicodedata

MAX_SLUG_LENGTH = 50


def slug_for(title: str) -> str:
    """Lowercase ASCII words of the title joined by dashes: "Hello, World!" -> "hello-world"."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_title.lower())
    if not words:
        raise ValueError(f"title {title!r} has no letters or digits to build a slug from")
    return "-".join(words)[:MAX_SLUG_LENGTH].rstrip("-")
