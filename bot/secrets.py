"""Secrets a run may have: the server's values, granted to repositories by name (DESIGN §8).

A value comes only from the server: the settings file's ``[secrets.<NAME>]`` ``value``, the
environment variable ``TRIMO_SECRET_<NAME>``, or a file ``<secrets_dir>/<NAME>`` (as Docker and
Kubernetes mount secrets). A secret goes only to the repositories its ``repos`` patterns name, and
to a fork's pull request only with ``forks = true``. `trimo run` on the user's own machine skips
the grants and may also read the user's environment (`LocalSecrets`).

Every value a run receives leaves through `Secrets.resolve` → `_released`, the one place a check
on the values themselves belongs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from bot.errors import RunRefused, TrimoError
from bot.secretscan import check_secret_value
from bot.settings import SECRET_ENV_PREFIX, SecretSetting, Settings

NOT_GRANTED = (
    "the repository asks for secret {name} (agent.secrets in .trimo/config.yml), which the "
    "server does not grant to {repo}: add a pattern matching {repo} to `repos` of "
    '[secrets.{name}] in Trimo\'s settings (e.g. repos = ["{repo}"])'
)
NOT_FOR_FORKS = (
    "this run is for a pull request from a fork, and secret {name} is not granted to fork runs "
    "(agent.secrets in .trimo/config.yml): set `forks = true` in [secrets.{name}] in Trimo's "
    "settings to allow it, or run without the secret"
)
NO_VALUE = (
    "the repository asks for secret {name} (agent.secrets in .trimo/config.yml), but the server "
    "has no value for it: set TRIMO_SECRET_{name} in Trimo's environment, `value` in "
    "[secrets.{name}], or a file {name} in secrets_dir"
)
NO_VALUE_LOCAL = (
    "the repository asks for secret {name} (agent.secrets in .trimo/config.yml), but it has no "
    "value: set {name} or TRIMO_SECRET_{name} in your environment"
)


class MissingSecretError(TrimoError):
    """A secret granted to the run has no value anywhere the server looks."""


class Secrets(Protocol):
    """Where a run's secret values come from."""

    def resolve(self, names: Sequence[str], repo: str, *, fork: bool) -> dict[str, str]:
        """The values of `names` for a run on `repo`; RunRefused if one is not granted."""
        ...


def granted(setting: SecretSetting | None, repo: str) -> bool:
    """Whether a secret's `repos` patterns (fnmatch-style, case-insensitive) match `repo`."""
    if setting is None:
        return False
    return any(fnmatchcase(repo.lower(), pattern.lower()) for pattern in setting.repos)


class ServerSecrets:
    """The server's secrets, each to the repositories it is granted to."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def resolve(self, names: Sequence[str], repo: str, *, fork: bool) -> dict[str, str]:
        # Every grant is checked before any value is read: a refused run reads none.
        for name in names:
            setting = self.settings.secrets.get(name)
            if not granted(setting, repo):
                raise RunRefused(NOT_GRANTED.format(name=name, repo=repo))
            if fork and not (setting and setting.forks):
                raise RunRefused(NOT_FOR_FORKS.format(name=name))
        values = {}
        for name in names:
            value = self.server_value(name)
            if value is None:
                raise MissingSecretError(NO_VALUE.format(name=name))
            values[name] = value
        return _released(values)

    def server_value(self, name: str) -> str | None:
        """`value` in the settings, then TRIMO_SECRET_<NAME>, then <secrets_dir>/<NAME>."""
        setting = self.settings.secrets.get(name)
        if setting is not None and setting.value is not None:
            return setting.value.get_secret_value()
        value = os.environ.get(SECRET_ENV_PREFIX + name)
        if value:
            return value
        if self.settings.secrets_dir is not None:
            return _read_secret_file(self.settings.secrets_dir, name)
        return None


class LocalSecrets(ServerSecrets):
    """`trimo run` on the user's machine: no grants, and the user's own environment counts."""

    def resolve(self, names: Sequence[str], repo: str, *, fork: bool) -> dict[str, str]:
        values = {}
        for name in names:
            value = self.server_value(name) or os.environ.get(name) or None
            if value is None:
                raise MissingSecretError(NO_VALUE_LOCAL.format(name=name))
            values[name] = value
        return _released(values)


def _read_secret_file(directory: Path, name: str) -> str | None:
    path = directory.expanduser() / name
    try:
        # Mounted secret files often end with a newline that is not part of the value.
        return path.read_text(encoding="utf-8").rstrip("\r\n") or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problem = getattr(exc, "strerror", None) or type(exc).__name__
        raise MissingSecretError(
            f"secret file {path} cannot be read ({problem}): check its permissions"
        ) from None


def _released(values: dict[str, str]) -> dict[str, str]:
    """Every secret value a run gets passes here, after its grant was checked."""
    for name, value in values.items():
        check_secret_value(name, value)
    return values
