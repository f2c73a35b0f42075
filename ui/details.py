"""What a run's page shows beyond the run's row: its phase timeline and its commits' diffs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bot.settings import Settings
from bot.states import PipelineKind, RunState
from bot.store import Pipeline, Run, RunEventRow
from bot.workspace import Remote, Workspace

GIT_TIMEOUT_SECONDS = 10
# A diff bigger than this is cut: the page stays quick, the branch has the rest.
MAX_DIFF_BYTES = 512 * 1024
RESULT_REF = "refs/trimo/results/{run_id}"


@dataclass(frozen=True)
class Phase:
    state: RunState
    started_at: datetime
    seconds: float | None  # None while it lasts
    reason: str | None = None


@dataclass(frozen=True)
class CommitDiff:
    sha: str
    author: str
    subject: str
    diff: str


def timeline(run: Run, states: list[RunEventRow], now: datetime | None = None) -> list[Phase]:
    """Each state the run went through, when it began and how long it lasted."""
    now = now or datetime.now(UTC)
    marks: list[tuple[RunState, datetime, str | None]] = [(RunState.QUEUED, run.created_at, None)]
    for row in states:
        try:
            state = RunState(row.message)
        except ValueError:
            continue
        if state == RunState.QUEUED and len(marks) == 1:
            continue
        marks.append((state, row.created_at, (row.data or {}).get("reason")))
    phases = []
    for index, (state, at, reason) in enumerate(marks):
        if index + 1 < len(marks):
            seconds: float | None = (marks[index + 1][1] - at).total_seconds()
        elif state.finished:
            seconds = 0.0
        else:
            seconds = None
        phases.append(Phase(state, at, seconds, reason))
    return phases


def mirror_of(settings: Settings, pipeline: Pipeline) -> Path:
    url = (
        pipeline.repo
        if pipeline.kind == PipelineKind.LOCAL
        else settings.repo_git_url(pipeline.repo)
    )
    return Workspace(settings.data_dir).mirror_path(Remote(url))


def commit_diffs(settings: Settings, pipeline: Pipeline, run: Run) -> list[CommitDiff]:
    """The commits the run handed back, with their diffs, read from the repository's mirror;
    empty when the run returned none or the mirror is gone."""
    if not run.base_sha:
        return []
    mirror = mirror_of(settings, pipeline)
    if not mirror.is_dir():
        return []
    # A result that was refused stays under its ref; a pushed one is the run's head, which the
    # pipeline branch keeps reachable in the mirror (pushes are fast-forwards only).
    ref = RESULT_REF.format(run_id=run.id)
    found = subprocess.run(
        ["git", "-C", str(mirror), "rev-parse", "--verify", "--quiet", ref],
        capture_output=True,
        timeout=GIT_TIMEOUT_SECONDS,
        check=False,
    )
    if found.returncode != 0:
        if not run.head_sha:
            return []
        ref = run.head_sha
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(mirror),
                "log",
                "--reverse",
                "--no-color",
                "--patch",
                "--format=%x1e%H%x1f%an%x1f%s%x1f",
                f"{run.base_sha}..{ref}",
            ],
            capture_output=True,
            timeout=GIT_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return []
    if out.returncode != 0:
        return []
    text = out.stdout[:MAX_DIFF_BYTES].decode("utf-8", "replace")
    commits = []
    for chunk in text.split("\x1e")[1:]:
        parts = chunk.split("\x1f", 3)
        if len(parts) < 4:
            continue
        sha, author, subject, diff = parts
        commits.append(CommitDiff(sha, author, subject, diff.strip("\n")))
    return commits
