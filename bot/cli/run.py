"""`trimo run`: dispatch an agent on a local repository and watch it become a tested branch."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from bot.cli.common import open_app
from bot.engine import RunContext
from bot.network import blocked_text
from bot.states import PHASES, PipelineKind, RunState
from bot.store import Run, Store
from bot.worker import dispatch
from bot.workspace import Remote

OUTCOME_STYLE = {
    RunState.SUCCEEDED: "bold green",
    RunState.FAILED: "bold red",
    RunState.ERROR: "bold red",
    RunState.TIMED_OUT: "bold yellow",
    RunState.CANCELLED: "bold yellow",
    RunState.BUDGET_EXCEEDED: "bold yellow",
    RunState.REJECTED: "bold red",
}
LAST_LINES = 8
NOT_A_REPO = "{path} is not a git repository with a commit: `git init` and commit first"


def slugify(text: str, limit: int = 40) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "task"
    slug = re.sub(r"[^a-z0-9]+", "-", first.lower()).strip("-")
    return (slug[:limit].rstrip("-")) or "task"


class TerminalProgress:
    """Shows phase, elapsed time and the last log lines; plain lines when not on a terminal."""

    def __init__(self, console: Console, run_id: int) -> None:
        self.console = console
        self.run_id = run_id
        self.started = time.monotonic()
        self.phase_started = self.started
        self.state = RunState.QUEUED
        self.lines: deque[str] = deque(maxlen=LAST_LINES)
        self.live: Live | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> TerminalProgress:
        if self.console.is_terminal:
            self.live = Live(
                self._render(),
                console=self.console,
                refresh_per_second=4,
                transient=True,
                get_renderable=self._render,
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    def _render(self) -> Group:
        with self._lock:
            steps = Text()
            current = PHASES.index(self.state) if self.state in PHASES else len(PHASES)
            for i, phase in enumerate(PHASES):
                style = "green" if i < current else ("bold cyan" if i == current else "dim")
                mark = "✓" if i < current else ("▶" if i == current else "·")
                steps.append(f"{mark} {phase.value}  ", style=style)
            head = Text(f"run {self.run_id}  {self._elapsed()}  ", style="bold")
            head.append(
                f"({time.monotonic() - self.phase_started:.0f}s in {self.state.value})", style="dim"
            )
            tail = Text("\n".join(f"  │ {line[:160]}" for line in self.lines), style="dim")
            return Group(head, steps, tail)

    def state_changed(self, run: Run) -> None:
        with self._lock:
            if run.state != self.state:
                self.state = run.state
                self.phase_started = time.monotonic()
        if self.live is None:
            self.console.print(f"[{self._elapsed()}] {run.state.value}", highlight=False)

    def logs(self, lines: list[str]) -> None:
        with self._lock:
            self.lines.extend(lines)
        if self.live is None:
            for line in lines:
                self.console.print(f"[{self._elapsed()}]   {line}", highlight=False, markup=False)


class _Observer:
    def __init__(self, progress: TerminalProgress, store: Store) -> None:
        self.progress = progress
        self.store = store
        self.seen_event = 0

    def state(self, run: Run) -> None:
        # Daemon-side events (mirror, image, branch, publish) are worth a line too.
        for ev in self.store.events(run.id, after_id=self.seen_event):
            self.seen_event = ev.id
            if ev.kind in ("mirror", "image", "branch", "publish", "stop"):
                self.progress.logs([f"trimo: {ev.message}"])
        self.progress.state_changed(run)

    def logs(self, run: Run, lines: list[str]) -> None:
        self.progress.logs(lines)


def print_summary(console: Console, store: Store, run: Run, branch: str, seconds: float) -> None:
    style = OUTCOME_STYLE.get(run.state, "bold")
    console.print(Text(f"run {run.id}: {run.state.value}", style=style), highlight=False)
    if run.reason:
        console.print(f"  reason:   {run.reason}", highlight=False, markup=False)
    if run.error and run.state in (RunState.ERROR, RunState.FAILED):
        console.print("  last lines:", highlight=False)
        for line in run.error.splitlines()[-15:]:
            console.print(f"    | {line}", highlight=False, markup=False)
    console.print(f"  branch:   {branch}", highlight=False, markup=False)
    commits = (run.report or {}).get("commits") or []
    console.print(
        f"  commits:  {len(commits)}" + (f" (head {run.head_sha[:12]})" if run.head_sha else ""),
        highlight=False,
    )
    for sha, subject in commits[:10]:
        console.print(f"    {sha[:10]} {subject}", highlight=False, markup=False)
    if run.tests_passed is not None:
        console.print(
            f"  tests:    {run.tests_passed} passed, {run.tests_failed} failed, "
            f"{run.tests_skipped} skipped"
            + (f", {run.tests_errors} errors" if run.tests_errors else ""),
            highlight=False,
        )
        for failure in run.failures[:10]:
            where = f" ({failure.get('file')}:{failure.get('line')})" if failure.get("file") else ""
            console.print(
                f"    ✗ {failure.get('name')}{where}: {str(failure.get('message') or '')[:200]}",
                highlight=False,
                markup=False,
            )
    elif run.tests_exit_code is not None:
        console.print(
            f"  tests:    no test report (the test command exited {run.tests_exit_code} "
            "without writing JUnit)",
            highlight=False,
        )
    else:
        console.print("  tests:    none run", highlight=False)
    if run.summary:
        # The agent's own words: shown as such, never as Trimo's findings.
        console.print("  agent's summary:", highlight=False)
        for line in run.summary.strip().splitlines()[:10]:
            console.print(f"    > {line}", highlight=False, markup=False)
    blocked = (run.report or {}).get("network_blocked") or []
    if blocked:
        console.print("  network:  blocked hosts", highlight=False)
        for line in blocked_text(blocked):
            console.print(f"  {line}", highlight=False, markup=False)
    console.print(f"  duration: {seconds:.1f}s", highlight=False)


def run_task(repo: Path, text: str, agent_command: str | None, settings_path: Path | None) -> Run:
    """Dispatch `text` on the local repository `repo` and show it to the end; the final run."""
    app = open_app(settings_path, need_engine=True)
    console = Console(stderr=False, highlight=False, soft_wrap=True)
    slug = slugify(text)
    key = f"local:{slug}"
    existing = app.store.find_pipeline(str(repo), key)
    number = len(app.store.list_pipelines(str(repo))) + 1
    pipeline = existing or app.store.get_or_create_pipeline(
        repo=str(repo),
        key=key,
        kind=PipelineKind.LOCAL,
        branch=f"trimo/{number}-{slug}",
        title=text.strip().splitlines()[0][:200] if text.strip() else slug,
    )
    engine = app.engine(local=True)
    queued = dispatch(app.store, pipeline, trigger="cli", task=text, agent_command=agent_command)
    claimed = engine.claim(queued.id)
    if claimed is None:
        raise click.ClickException(f"run {queued.id} was taken by another worker")
    started = time.monotonic()
    console.print(f"trimo: run {claimed.id} on {repo} → branch {pipeline.branch}", markup=False)
    with TerminalProgress(console, claimed.id) as progress:
        final = engine.execute(
            claimed, RunContext(remote=Remote(str(repo))), _Observer(progress, app.store)
        )
    print_summary(console, app.store, final, pipeline.branch, time.monotonic() - started)
    app.store.close()
    return final


@click.command("run")
@click.option(
    "--repo",
    "repo_path",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="The local git repository to work on.",
)
@click.option("--task", help="What the agent should do.")
@click.option(
    "--task-file", type=click.File("r"), help="Read the task from a file ('-' for stdin)."
)
@click.option(
    "--agent",
    "agent_command",
    help="Agent command, or a preset: claude-code, codex, aider (overrides .trimo/config.yml).",
)
@click.option(
    "--settings",
    "settings_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Settings file (TOML); TRIMO_* environment variables override it.",
)
def run(
    repo_path: Path,
    task: str | None,
    task_file: Any,
    agent_command: str | None,
    settings_path: Path | None,
) -> None:
    """Run an agent on a local repository: its commits land on a `trimo/...` branch there.

    Secrets the repository asks for (agent.secrets) come from the settings, TRIMO_SECRET_<NAME>,
    the secrets directory, or, as this is your own machine, a plain <NAME> in your environment.
    The server (`trimo serve`) never reads plain environment variables and grants each secret
    only to the repositories its settings name.
    """
    if (task is None) == (task_file is None):
        raise click.UsageError("give exactly one of --task or --task-file")
    text = task if task is not None else str(task_file.read())
    repo = repo_path.resolve()
    if not (repo / ".git").exists() and not (repo / "HEAD").exists():
        raise click.ClickException(NOT_A_REPO.format(path=repo))
    final = run_task(repo, text, agent_command, settings_path)
    sys.exit(0 if final.state == RunState.SUCCEEDED else 1)


@click.command("demo")
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to make the sample repository (default: <data dir>/demo/sample-repo).",
)
@click.option("--settings", "settings_path", type=click.Path(path_type=Path), default=None)
def demo(dest: Path | None, settings_path: Path | None) -> None:
    """Make the bundled sample repository (a Django app whose Postgres-backed test fails) and
    dispatch a command agent that fixes it: the result is a tested branch you can `git log`."""
    from bot.sample import AGENT, TASK, make_sample_repo
    from bot.settings import Settings

    if dest is None:
        dest = Settings.load(settings_path).data_dir / "demo" / "sample-repo"
    repo = make_sample_repo(dest.resolve())
    click.echo(f"trimo: sample repository at {repo} (main has a failing test)")
    final = run_task(repo, TASK, AGENT, settings_path)
    if final.state == RunState.SUCCEEDED:
        pipeline_branch = f"git -C {repo} log --oneline main..{_branch_of(repo)}"
        click.echo(f"\nSee the agent's work: {pipeline_branch}")
    sys.exit(0 if final.state == RunState.SUCCEEDED else 1)


def _branch_of(repo: Path) -> str:
    import subprocess

    out = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "for-each-ref",
            "--sort=-committerdate",
            "--format=%(refname:short)",
            "refs/heads/trimo/",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return out[0] if out else "trimo/..."
