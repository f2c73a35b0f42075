"""The Page model."""

from django.db import models

from pages.slugs import slug_for


class Page(models.Model):
    title = models.CharField(max_length=200)
    slug = models.SlugField(max_length=50, unique=True)
    body = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def save(self, *args, **kwargs):
        if not self.slug:
            self.slug = slug_for(self.title)
        super().save(*args, **kwargs)

    def __str__(self) -> str:
        return self.title
