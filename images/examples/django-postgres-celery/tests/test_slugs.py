"""Slugs built from page titles."""

import pytest

from pages.slugs import MAX_SLUG_LENGTH, slug_for


@pytest.mark.parametrize(
    ("title", "slug"),
    [
        ("Hello, World!", "hello-world"),
        ("  Déjà vu  ", "deja-vu"),
        ("Release 2.0 notes", "release-2-0-notes"),
    ],
)
def test_slug_is_lowercase_ascii_words_joined_by_dashes(title: str, slug: str) -> None:
    assert slug_for(title) == slug


def test_long_slug_is_cut_without_a_trailing_dash() -> None:
    slug = slug_for("word " * 40)
    assert len(slug) <= MAX_SLUG_LENGTH
    assert not slug.endswith("-")


def test_title_without_letters_is_refused() -> None:
    with pytest.raises(ValueError, match="no letters or digits"):
        slug_for("!!!")
