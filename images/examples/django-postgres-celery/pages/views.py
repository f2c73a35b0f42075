"""JSON views: create a page, show a page (and count the view in the background)."""

import json

from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from pages.models import Page
from pages.tasks import count_view


def as_json(page: Page) -> dict:
    return {"title": page.title, "slug": page.slug, "body": page.body}


@csrf_exempt
@require_POST
def create_page(request: HttpRequest) -> JsonResponse:
    try:
        payload = json.loads(request.body)
        page = Page.objects.create(title=payload["title"], body=payload.get("body", ""))
    except (ValueError, KeyError) as error:
        return JsonResponse({"error": f"expected JSON with a title: {error}"}, status=400)
    return JsonResponse(as_json(page), status=201)


@require_GET
def show_page(request: HttpRequest, slug: str) -> JsonResponse:
    page = get_object_or_404(Page, slug=slug)
    count_view.delay(page.slug)
    return JsonResponse(as_json(page))
