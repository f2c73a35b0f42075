"""deploy/compose.yml holds together without a compose binary: what it starts, what it sets and
mounts, are what Trimo's commands, settings and image expect."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from bot.cli import cli
from bot.health import STATUS_DIR
from bot.settings import SETTINGS_FILE_ENV, WEBHOOK_SECRET_ENV, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SECRETS_AT = "/run/secrets/"
SOCKET = "/var/run/docker.sock"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("TRIMO_"):
            monkeypatch.delenv(name)
    yield


def _trimo(services: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in services.items() if s.get("image") == "trimo/server:local"}


def _image_env(name: str) -> str:
    """An ENV value the repository's Dockerfile sets."""
    match = re.search(rf"\b{name}=(\S+)", (ROOT / "Dockerfile").read_text())
    assert match, f"the Dockerfile sets no {name}"
    return match.group(1)


def _known_env() -> set[str]:
    names = {f"TRIMO_{field.upper()}" for field in Settings.model_fields}
    names |= {SETTINGS_FILE_ENV, WEBHOOK_SECRET_ENV}
    for param in cli.params:  # the group's own options (--log-format)
        if isinstance(param.envvar, str):
            names.add(param.envvar)
    return names


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """target → source of a service's short-form volumes."""
    found = {}
    for entry in service.get("volumes", []):
        # `${NAME:-default}` as compose reads it with NAME unset.
        plain = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", entry)
        source, target, *_ = plain.split(":")
        found[target] = source
    return found


def test_it_runs_a_receiver_two_workers_and_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    trimo = _trimo(services)
    assert set(services) == {"postgres", *trimo}
    commands = {name: s["command"] for name, s in trimo.items()}
    assert commands.pop("serve") == ["serve", "--no-worker"]
    assert list(commands.values()) == [["worker"], ["worker"]]
    for name, service in trimo.items():
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
    # Built here, from the repository's Dockerfile and the database's own: nothing to pull.
    build = trimo["serve"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert (DEPLOY / services["postgres"]["build"] / "Dockerfile").is_file()


def test_each_command_is_a_trimo_command_with_those_options(compose: dict[str, Any]) -> None:
    for name, service in _trimo(compose["services"]).items():
        command, *args = service["command"]
        assert command in cli.commands, f"{name}: trimo has no command {command}"
        # Parsing is what `trimo` would do with these arguments; a wrong option fails here.
        with click.Context(cli) as parent:
            cli.commands[command].make_context(command, list(args), parent=parent)


def test_every_trimo_variable_is_a_setting_trimo_reads(compose: dict[str, Any]) -> None:
    known = _known_env()
    for name, service in _trimo(compose["services"]).items():
        env = service["environment"]
        unknown = {key for key in env if key.startswith("TRIMO_") and key not in known}
        assert not unknown, f"{name} sets what Trimo never reads: {unknown}"


def test_secret_files_are_mounted_where_the_settings_point(compose: dict[str, Any]) -> None:
    declared = compose["secrets"]
    for name, service in compose["services"].items():
        mounted = set(service.get("secrets", []))
        assert mounted <= set(declared), name
        for key, value in service["environment"].items():
            if str(value).startswith(SECRETS_AT):
                secret = str(value).removeprefix(SECRETS_AT)
                assert secret in mounted, f"{name}: {key} names a secret it does not mount"
    trimo_env = compose["services"]["serve"]["environment"]
    assert trimo_env[SETTINGS_FILE_ENV] == SECRETS_AT + "trimo.toml"
    # Secrets are files, never values in the environment, where `docker inspect` shows them.
    for service in compose["services"].values():
        for key in service["environment"]:
            assert not re.search(r"PASSWORD$|SECRET$|_KEY$|TOKEN", key), key
    for secret in declared.values():
        assert secret["file"].startswith("secrets/")
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "deploy/secrets" in (ROOT / ".dockerignore").read_text().split()


def test_only_the_workers_hold_the_engine_socket(compose: dict[str, Any]) -> None:
    trimo = _trimo(compose["services"])
    serve = trimo.pop("serve")
    assert SOCKET not in _volumes(serve)
    assert "DOCKER_HOST" not in serve["environment"]
    assert serve["user"] != "root" and "ports" in serve
    data_dir = _image_env("TRIMO_DATA_DIR")
    status = f"{data_dir}/{STATUS_DIR}"
    data_volumes = set()
    for name, worker in trimo.items():
        volumes = _volumes(worker)
        assert worker["environment"]["DOCKER_HOST"] == f"unix://{SOCKET}", name
        assert SOCKET in volumes, name
        assert "ports" not in worker, name
        # /healthz of the receiver sees a worker through the status files they share.
        assert volumes[status] == _volumes(serve)[status], name
        data_volumes.add(volumes[data_dir])
        assert worker["hostname"] == name  # the worker's id starts with it
    # Each worker keeps its own mirrors: one volume each, none the receiver's.
    assert len(data_volumes) == len(trimo)
    assert _volumes(serve)[data_dir] not in data_volumes


def test_the_example_settings_file_loads_as_trimo_settings() -> None:
    example = DEPLOY / "trimo.example.toml"
    settings = Settings.load(example)
    assert settings.database_url.startswith("postgresql://")
    assert "@postgres:5432/" in settings.database_url  # the service's name on the network
    assert settings.app_id is not None and settings.webhook_secrets
    assert set(tomllib.loads(example.read_text())) <= set(Settings.model_fields)
