"""Who may see a run and press its buttons: everyone on a local `trimo ui`; on `trimo serve`,
people signed in with GitHub, by their permission on the run's repository."""

from __future__ import annotations

from typing import Protocol


class Access(Protocol):
    """The signed-in person's view of repositories, for one request."""

    def user(self) -> str | None:
        """The person's login; None when nobody is signed in."""
        ...

    def can_read(self, repo: str) -> bool: ...

    def can_act(self, repo: str) -> bool:
        """Whether retry, stop and tests-only are theirs to press on `repo`."""
        ...


class LocalAccess:
    """`trimo ui` on 127.0.0.1: whoever reaches the page runs Trimo on this machine."""

    def user(self) -> str | None:
        return "local"

    def can_read(self, repo: str) -> bool:
        return True

    def can_act(self, repo: str) -> bool:
        return True


class NoAccess:
    """`trimo serve` without the App's OAuth credentials: nobody can sign in, nobody sees runs."""

    def user(self) -> str | None:
        return None

    def can_read(self, repo: str) -> bool:
        return False

    def can_act(self, repo: str) -> bool:
        return False
