"""Trimo's exceptions: one base, each carrying what a person needs to act."""

from __future__ import annotations


class TrimoError(Exception):
    """Base of every error Trimo raises on purpose."""


class ConfigError(TrimoError):
    """A repository's `.trimo/` configuration is invalid.

    `path` is the file, `field` the dotted field path (e.g. ``resources.memory``), `expected`
    what would be valid. str() gives the one-line message shown to users.
    """

    def __init__(self, path: str, field: str, expected: str) -> None:
        self.path = path
        self.field = field
        self.expected = expected
        super().__init__(f"{path}: {field}: {expected}")


class SettingsError(TrimoError):
    """A server setting is missing or wrong; the message names it and the fix."""


class ImageBuildError(TrimoError):
    """`docker build` failed; `tail` holds the build's last output lines."""

    def __init__(self, message: str, tail: list[str]) -> None:
        self.tail = tail
        super().__init__(message)


class WorkspaceError(TrimoError):
    """A git operation on the run's workspace failed."""


class PublishRefused(TrimoError):
    """The run's result may not be published (unrelated history, protected path, ...)."""


class NoSuchRunError(TrimoError):
    """No run with that id."""


class RunRefused(TrimoError):
    """The run may not start as asked (a secret not granted, a fork's head moved since approval);
    it ends `rejected` before any container exists, with this message as its reason."""
