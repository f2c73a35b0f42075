"""Secret masking: replaces every known secret value with `***` in text and nested data."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
# Shorter values would mask ordinary words and digits everywhere ("on", "1").
MIN_SECRET_LENGTH = 3


class Masker:
    """Masks the given secret values; build once per run, then call `mask` for every line."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        values = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        # Longest first, so a secret that contains another one is masked whole.
        ordered = sorted(values, key=lambda s: (-len(s), s))
        self._count = len(ordered)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __repr__(self) -> str:
        return f"Masker(<{self._count} secrets>)"

    def __bool__(self) -> bool:
        return self._pattern is not None

    def mask(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def mask_obj(self, obj: object) -> object:
        """A copy of `obj` with every string inside dicts, lists and tuples masked (keys too)."""
        if isinstance(obj, str):
            return self.mask(obj)
        if isinstance(obj, dict):
            return {self.mask_obj(k): self.mask_obj(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.mask_obj(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.mask_obj(v) for v in obj)
        return obj
