"""`trimo runs`: list, inspect, follow and cancel runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from bot.cli.common import open_app, settings_option
from bot.errors import NoSuchRunError
from bot.gateway.policy import usage_line
from bot.store import Run, Store

FOLLOW_POLL_SECONDS = 0.5
NO_RESULT = "run {run_id} handed back no commits: there is no patch to show"
RESULT_GONE = (
    "the commits of run {run_id} are no longer in the mirror {mirror} ({detail}); "
    "they were kept there under {ref}"
)
CANCELLED_BY_CLI = "cancelled with `trimo runs cancel`"


def _duration(run: Run) -> str:
    if run.started_at is None:
        return "-"
    end = run.finished_at or datetime.now(UTC)
    return f"{(end - run.started_at).total_seconds():.0f}s"


def _tests(run: Run) -> str:
    if run.tests_passed is None:
        return "no report" if run.tests_exit_code is not None else "-"
    return f"{run.tests_passed}/{run.tests_failed}/{run.tests_skipped}"


def _tests_info(run: Run) -> dict[str, object] | str | None:
    if run.tests_passed is None:
        if run.tests_exit_code is None:
            return None
        return f"no test report (the test command exited {run.tests_exit_code})"
    return {
        "passed": run.tests_passed,
        "failed": run.tests_failed,
        "skipped": run.tests_skipped,
        "errors": run.tests_errors,
        "exit_code": run.tests_exit_code,
    }


def _get(store: Store, run_id: int) -> Run:
    try:
        return store.get_run(run_id)
    except NoSuchRunError as exc:
        raise click.ClickException(f"no run {run_id}: `trimo runs ls` lists them") from exc


@click.group("runs")
def runs() -> None:
    """List, inspect, follow and cancel runs."""


@runs.command("ls")
@click.option("-n", "--limit", default=20, show_default=True)
@settings_option
def ls(limit: int, settings_path: Path | None) -> None:
    """The latest runs."""
    app = open_app(settings_path)
    rows = app.store.list_runs(limit=limit)
    if not rows:
        click.echo("no runs yet: `trimo run --task ...` starts one")
        return
    click.echo(
        f"{'ID':>5}  {'STATE':<11} {'PIPELINE':<40} {'TESTS P/F/S':<12} {'TIME':>6}  CREATED"
    )
    for r in rows:
        p = app.store.get_pipeline(r.pipeline_id)
        click.echo(
            f"{r.id:>5}  {r.state.value:<11} {p.branch[:40]:<40} {_tests(r):<12} "
            f"{_duration(r):>6}  {r.created_at:%Y-%m-%d %H:%M:%S}"
        )


@runs.command("show")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--patch",
    "as_patch",
    is_flag=True,
    help="Print the run's commits as a patch (also those Trimo refused to publish).",
)
@settings_option
def show(run_id: int, as_json: bool, as_patch: bool, settings_path: Path | None) -> None:
    """One run: state, reason, branch, commits, tests."""
    app = open_app(settings_path)
    r = _get(app.store, run_id)
    if as_patch:
        _print_patch(r)
        return
    p = app.store.get_pipeline(r.pipeline_id)
    info = {
        "id": r.id,
        "state": r.state.value,
        "reason": r.reason,
        "repo": p.repo,
        "branch": p.branch,
        "trigger": r.trigger,
        "sender": r.sender,
        "mode": r.mode.value,
        "base": r.base_sha,
        "head": r.head_sha,
        "commits": r.commits,
        "image": r.image_tag,
        "tests": _tests_info(r),
        "failures": r.failures,
        "agent_summary": r.summary,
        "model_usage": r.usage,
        "superseded_by": r.superseded_by,
        "created": r.created_at.isoformat(),
        "duration": _duration(r),
        "error": r.error,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    info["model_usage"] = usage_line(r.usage)
    for key, value in info.items():
        if value not in (None, [], ""):
            click.echo(f"{key + ':':<14}{value}")


def _print_patch(run: Run) -> None:
    # The commits stay in the repository's mirror, refused or not: the patch is read from there.
    result = (run.report or {}).get("result")
    if not isinstance(result, dict):
        raise click.ClickException(NO_RESULT.format(run_id=run.id))
    done = subprocess.run(
        [
            "git",
            "-C",
            str(result["mirror"]),
            "format-patch",
            "--stdout",
            "--binary",
            f"{result['base']}..{result['head']}",
        ],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise click.ClickException(
            RESULT_GONE.format(
                run_id=run.id,
                mirror=result["mirror"],
                ref=result["ref"],
                detail=done.stderr.decode(errors="replace").strip()[-300:],
            )
        )
    sys.stdout.buffer.write(done.stdout)
    sys.stdout.flush()


@runs.command("logs")
@click.argument("run_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run finishes.")
@settings_option
def logs(run_id: int, follow: bool, settings_path: Path | None) -> None:
    """A run's log: the container's output and Trimo's own steps."""
    app = open_app(settings_path)
    _get(app.store, run_id)
    after = 0
    while True:
        for ev in app.store.events(run_id, after_id=after):
            after = ev.id
            stamp = f"{ev.created_at:%H:%M:%S}"
            if ev.kind == "log":
                click.echo(f"{stamp}   {ev.message}")
            elif ev.kind == "step":
                # The agent's transcript: one readable line per step it took.
                click.echo(f"{stamp} ● {ev.message}")
            elif ev.kind != "event" or (ev.data or {}).get("event") != "heartbeat":
                click.echo(f"{stamp} ▸ {ev.kind}: {ev.message}")
        if not follow or app.store.get_run(run_id).finished:
            break
        time.sleep(FOLLOW_POLL_SECONDS)


@runs.command("cancel")
@click.argument("run_id", type=int)
@settings_option
def cancel(run_id: int, settings_path: Path | None) -> None:
    """Stop a run: its work so far is committed and pushed, then it ends `cancelled`."""
    app = open_app(settings_path)
    r = _get(app.store, run_id)
    if r.finished:
        raise click.ClickException(f"run {run_id} already ended: {r.state.value}")
    after, before_it_started = app.store.cancel_run(run_id, CANCELLED_BY_CLI)
    if before_it_started:
        click.echo(f"run {run_id}: cancelled before it started")
        return
    if after.finished:
        raise click.ClickException(f"run {run_id} already ended: {after.state.value}")
    click.echo(
        f"run {run_id}: cancel requested; its worker stops the container and pushes the work so far"
    )
