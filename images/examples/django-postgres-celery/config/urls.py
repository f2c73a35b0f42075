"""URL routes of the pages project."""

from django.urls import path

from pages import views

urlpatterns = [
    path("pages/", views.create_page, name="create-page"),
    path("pages/<slug:slug>/", views.show_page, name="show-page"),
]
