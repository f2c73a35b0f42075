"""Intents: what a delivery asks Trimo to do; the receiver records them, the worker executes them.

An intent is what the payload says, not a decision: the receiver does no GitHub call, so the worker
still checks the sender's permission, fetches what the payload lacks (a PR's head commit when the
command came as an issue comment) and answers. Intents are stored as JSON (`dump_intents`) and read
back as typed models (`load_intents`); `type` tells them apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from bot.states import PipelineKind, RunMode

CommentKind = Literal["issue", "review"]
CancelReason = Literal["closed", "unlabeled", "command"]


class _Intent(BaseModel):
    """Fields every intent carries: the delivery it comes from and who sent it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    installation_id: int | None
    sender: str  # login
    sender_type: str  # "User", "Bot", "Organization"
    delivery_id: str


class _RepoIntent(_Intent):
    """An intent about one issue or PR; from a comment, the worker reacts and answers there."""

    repo: str  # "owner/name"
    kind: PipelineKind | None = None
    number: int | None = None
    comment_id: int | None = None
    comment_kind: CommentKind | None = None


class RunIntent(_RepoIntent):
    """Start a run: a trigger label, a `/trimo run|retry|test` command, or a check run "Re-run".

    For `trigger="check_run"`, `kind` and `number` may be None: the worker finds the pipeline by
    `check_run_id`. For pull requests, `head_sha`/`head_ref`/`head_repo`/`is_fork` are None when the
    payload does not carry them (a command in an issue comment on a PR); the worker must look them
    up before anything runs — never treat None as "not a fork".
    """

    type: Literal["run"] = "run"
    trigger: Literal["label", "command", "check_run"]
    title: str = ""
    body: str = ""
    instructions: str | None = None
    mode: RunMode = RunMode.AGENT
    retry: bool = False
    head_sha: str | None = None
    head_ref: str | None = None
    head_repo: str | None = None
    is_fork: bool | None = None
    check_run_id: int | None = None

    @model_validator(mode="after")
    def _target_known(self) -> RunIntent:
        if self.trigger != "check_run" and (self.kind is None or self.number is None):
            raise ValueError(f"a run triggered by {self.trigger} needs kind and number")
        if self.trigger == "check_run" and self.check_run_id is None:
            raise ValueError("a run triggered by a check run needs check_run_id")
        return self


class CancelIntent(_RepoIntent):
    """Stop the live run of a pipeline: the issue/PR closed, the label removed, or `/trimo stop`."""

    type: Literal["cancel"] = "cancel"
    reason: CancelReason


class StatusIntent(_RepoIntent):
    """`/trimo status`: answer with the state of the pipeline's latest run."""

    type: Literal["status"] = "status"


class HelpIntent(_RepoIntent):
    """`/trimo help`, `/trimo` alone, or an unknown verb (`unknown`; nearest verb: `suggestion`)."""

    type: Literal["help"] = "help"
    unknown: str | None = None
    suggestion: str | None = None


class ApproveIntent(_RepoIntent):
    """`/trimo approve`: allow runs on a fork PR; the worker fetches the head commit it binds to."""

    type: Literal["approve"] = "approve"


class InstallationIntent(_Intent):
    """The App was installed or removed, or repositories were added to or removed from it."""

    type: Literal["installation"] = "installation"
    action: Literal["created", "deleted", "added", "removed", "suspend", "unsuspend"]
    account: str
    repositories: list[str] = Field(default_factory=list)


Intent = Annotated[
    RunIntent | CancelIntent | StatusIntent | HelpIntent | ApproveIntent | InstallationIntent,
    Field(discriminator="type"),
]

# Built once: a TypeAdapter compiles its validator and serializer.
_INTENTS = TypeAdapter(list[Intent])


def dump_intents(intents: list[Intent]) -> str:
    """Intents as one JSON array (the form stored with a delivery).

    Their text comes from payloads webhooks/payloads.py decoded, which holds no lone surrogate.
    """
    return _INTENTS.dump_json(intents).decode()


def load_intents(text: str) -> list[Intent]:
    """Intents read back from `dump_intents` output; raises pydantic.ValidationError if invalid."""
    return _INTENTS.validate_json(text)


def intents_from(data: Any) -> list[Intent]:
    """Intents from their JSON form already parsed (a list of dicts)."""
    return _INTENTS.validate_python(data)
