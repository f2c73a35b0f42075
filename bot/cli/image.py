"""`trimo image`: build, list and bootstrap development images."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import docker

from bot.cli.common import reap_quietly
from bot.errors import ImageBuildError, SettingsError, TrimoError
from bot.images import bootstrap_debian, build_image, ensure_base, list_images
from bot.runtime import engine_client
from bot.settings import Settings


def _progress(line: str) -> None:
    click.echo(line, err=True)


def _client() -> docker.DockerClient:
    try:
        client = engine_client()
        client.ping()
    except docker.errors.DockerException as exc:
        raise click.ClickException(
            f"no Docker engine answers ({exc}); start dockerd or set DOCKER_HOST"
        ) from exc
    return client


def _extra_ca_certs() -> Path | None:
    """The server's extra_ca_certs: the base image must come out as `trimo run` would build it."""
    try:
        return Settings.load().extra_ca_certs
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def image() -> None:
    """Build and list development images."""
    reap_quietly()


@image.command("build")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tag", "-t", help="Tag for the image (default: trimo/<name>:ctx-<hash>).")
@click.option("--dockerfile", "-f", default="Dockerfile", show_default=True)
@click.option("--no-cache", is_flag=True, help="Build even if an image of this context exists.")
def build(path: Path, tag: str | None, dockerfile: str, no_cache: bool) -> None:
    """Build the image in PATH (a build context), unless one of the same content exists."""
    client = _client()
    with _build_errors():
        if _builds_from_base(path / dockerfile):
            ensure_base(client, _progress, _extra_ca_certs())
        result = build_image(
            client, path, tag=tag, dockerfile=dockerfile, progress=_progress, nocache=no_cache
        )
    click.echo(result.tag)


@contextmanager
def _build_errors() -> Iterator[None]:
    """A failed build shows its last lines, then one error line; nothing else is said."""
    try:
        yield
    except ImageBuildError as exc:
        for line in exc.tail:
            click.echo(f"  | {line}", err=True)
        raise click.ClickException(str(exc)) from exc
    except TrimoError as exc:
        raise click.ClickException(str(exc)) from exc


def _builds_from_base(dockerfile: Path) -> bool:
    return dockerfile.is_file() and "trimo/base:" in dockerfile.read_text(errors="replace")


@image.command("ls")
def ls() -> None:
    """List the images Trimo built."""
    rows = list_images(_client())
    if not rows:
        click.echo("no Trimo images yet: `trimo image build PATH` makes one")
        return
    click.echo(f"{'IMAGE':<48} {'ID':<12} {'CONTEXT':<12} {'SIZE':>9}  AGE")
    now = time.time()
    for row in rows:
        tags = row["tags"] or ["<untagged>"]
        size = f"{int(str(row['size'])) / 1e6:.0f} MB"
        age = _age(now - int(str(row["created"])))
        for t in tags:  # type: ignore[attr-defined]
            click.echo(f"{t:<48} {row['id']!s:<12} {row['context_hash']!s:<12} {size:>9}  {age}")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


@image.command("bootstrap")
@click.option("--no-pull", is_flag=True, help="Do not try a registry first.")
def bootstrap(no_pull: bool) -> None:
    """Make debian:bookworm (from Debian's archive if no registry answers), then trimo/base."""
    client = _client()
    with _build_errors():
        bootstrap_debian(client, _progress, try_pull=not no_pull)
        result = ensure_base(client, _progress, _extra_ca_certs())
    click.echo(result.tag)
