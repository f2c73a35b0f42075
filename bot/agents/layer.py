"""The agent layer: `<repository image> + images/agents/<preset>/`, built once per content hash."""

from __future__ import annotations

import docker

from bot import images
from bot.images import BuildResult, Progress


def build_agent_layer(
    client: docker.DockerClient,
    repo_image: str,
    preset: str,
    progress: Progress | None = None,
) -> BuildResult:
    """The repository's image with the preset's CLI on top; reused while neither changed.

    The repository image is a build argument, and its id is part of the layer's content hash
    (images.context_hash follows FROM through build arguments): a new repository image makes a
    new layer, an unchanged one makes nothing.
    """
    context = images.images_dir() / "agents" / preset
    base_name = repo_image.rpartition(":")[0].rpartition("/")[2] or "project"
    return images.build_image(
        client,
        context,
        buildargs={"REPO_IMAGE": _stable_name(client, repo_image)},
        name=f"{base_name}-{preset}",
        progress=progress,
    )


def _stable_name(client: docker.DockerClient, image: str) -> str:
    """The image's content-hash tag when it has one: the same repository image goes by several
    names (one per checkout's folder), and a build argument is part of the layer's hash."""
    tags = client.images.get(image).tags
    stable = sorted(t for t in tags if t.startswith(images.HASH_REPO + ":"))
    return stable[0] if stable else image
