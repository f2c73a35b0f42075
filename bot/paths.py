"""Protected paths: gitignore-style patterns, matched as git matches them (leaf module)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import pathspec


@lru_cache(maxsize=256)
def _spec(patterns: tuple[str, ...]) -> pathspec.GitIgnoreSpec:
    return pathspec.GitIgnoreSpec.from_lines(patterns)


def is_protected(path: str, patterns: Sequence[str]) -> bool:
    """Whether repository path `path` matches `patterns` (last match wins, `!pattern`
    un-protects, a directory pattern covers everything under it)."""
    return _spec(tuple(patterns)).match_file(path.lstrip("/"))
