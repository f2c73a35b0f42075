"""Pages stored in the real Postgres."""

import pytest
from django.db import IntegrityError, connection

from pages.models import Page

pytestmark = pytest.mark.django_db


def test_page_round_trips_through_postgres() -> None:
    created = Page.objects.create(title="Getting Started", body="Run the tests.")

    loaded = Page.objects.get(slug="getting-started")

    assert loaded.pk == created.pk
    assert (loaded.title, loaded.body) == ("Getting Started", "Run the tests.")
    assert connection.vendor == "postgresql"


def test_postgres_refuses_a_second_page_with_the_same_slug() -> None:
    Page.objects.create(title="Changelog")
    with pytest.raises(IntegrityError):
        Page.objects.create(title="changelog!")
