"""The pages: runs list, a run, its live log (Server-Sent Events), a pipeline; the buttons."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from bot.errors import NoSuchRunError, TrimoError
from bot.network import EGRESS_DENIED
from bot.states import FINISHED, PipelineKind, RunMode, RunState
from bot.store import Pipeline, Run, RunEventRow
from bot.worker import dispatch
from ui.access import Access
from ui.app import EXTENSION, UI
from ui.details import commit_diffs, timeline

PAGE_SIZE = 50
BUSY_RETRY = "retry: 3000\n\n"
# The run page shows the end of the log; the whole of it is one link away.
LOG_TAIL_LINES = 2000
STOPPED_HERE = "stopped by {user} on the run page"
NOT_ALLOWED = "You need {minimum} permission on {repo} to do that."

bp = Blueprint(
    "ui",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/ui/static",
)


def _ui() -> UI:
    ui: UI = current_app.extensions[EXTENSION]
    return ui


def _access() -> Access:
    return _ui().access()


def _visible_run(run_id: int) -> tuple[Run, Pipeline]:
    """The run and its pipeline; 404 as well when the person may not read the repository, so
    nobody learns which private repositories use Trimo."""
    store = _ui().store
    try:
        run = store.get_run(run_id)
    except NoSuchRunError:
        abort(404)
    pipeline = store.get_pipeline(run.pipeline_id)
    if not _access().can_read(pipeline.repo):
        abort(404)
    return run, pipeline


def duration(run: Run) -> float | None:
    if run.started_at is None:
        return None
    return ((run.finished_at or datetime.now(UTC)) - run.started_at).total_seconds()


def human(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return (
        f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s" if seconds < 10 else f"{secs}s"
    )


def usage(run: Run) -> dict[str, Any] | None:
    """Tokens and cost, when the run's report has them."""
    found = (run.report or {}).get("usage")
    return found if isinstance(found, dict) else None


def links(pipeline: Pipeline) -> dict[str, str]:
    if pipeline.kind == PipelineKind.LOCAL:
        return {}
    web = f"{_ui().settings.web_url}/{pipeline.repo}"
    found = {"branch": f"{web}/tree/{pipeline.branch}"}
    if pipeline.kind == PipelineKind.ISSUE and pipeline.number:
        found["issue"] = f"{web}/issues/{pipeline.number}"
        if pipeline.pr_number:
            found["pull request"] = f"{web}/pull/{pipeline.pr_number}"
    elif pipeline.kind == PipelineKind.PULL and pipeline.number:
        found["pull request"] = f"{web}/pull/{pipeline.number}"
    return found


@bp.app_context_processor
def _signin() -> dict[str, Any]:
    return {"signin_enabled": "signin.start" in current_app.view_functions}


@bp.app_template_global()
def state_class(state: RunState) -> str:
    if state == RunState.SUCCEEDED:
        return "ok"
    if state in FINISHED:
        return "bad" if state != RunState.CANCELLED else "off"
    return "live"


@bp.get("/")
def index() -> BaseResponse:
    return redirect(url_for("ui.runs"))


@bp.get("/runs")
def runs() -> str:
    ui = _ui()
    access = _access()
    repo = request.args.get("repo") or None
    state = request.args.get("state") or None
    states = [RunState(state)] if state in {s.value for s in RunState} else None
    before = request.args.get("before", type=int)
    rows: list[tuple[Run, Pipeline]] = []
    pipelines: dict[int, Pipeline] = {}
    cursor = before
    # Runs of repositories the person cannot read are skipped, not counted as a page.
    while len(rows) < PAGE_SIZE:
        batch = ui.store.list_runs(limit=PAGE_SIZE, repo=repo, states=states, before_id=cursor)
        if not batch:
            cursor = None
            break
        for run in batch:
            if run.pipeline_id not in pipelines:
                pipelines[run.pipeline_id] = ui.store.get_pipeline(run.pipeline_id)
            pipeline = pipelines[run.pipeline_id]
            if access.can_read(pipeline.repo):
                rows.append((run, pipeline))
            if len(rows) == PAGE_SIZE:
                break
        cursor = rows[-1][0].id if len(rows) == PAGE_SIZE else batch[-1].id
        if len(batch) < PAGE_SIZE:
            cursor = None if len(rows) < PAGE_SIZE else cursor
            break
    repos = sorted({p.repo for p in ui.store.list_pipelines() if access.can_read(p.repo)})
    return render_template(
        "runs.html",
        rows=rows,
        repos=repos,
        repo=repo,
        state=state,
        states=[s.value for s in RunState],
        next_before=cursor,
        duration=duration,
        human=human,
        usage=usage,
        user=access.user(),
    )


@bp.get("/pipelines/<int:pipeline_id>")
def pipeline(pipeline_id: int) -> str:
    ui = _ui()
    try:
        found = ui.store.get_pipeline(pipeline_id)
    except TrimoError:
        abort(404)
    if not _access().can_read(found.repo):
        abort(404)
    before = request.args.get("before", type=int)
    rows = ui.store.list_runs(limit=PAGE_SIZE, pipeline_id=pipeline_id, before_id=before)
    return render_template(
        "pipeline.html",
        pipeline=found,
        rows=[(r, found) for r in rows],
        links=links(found),
        next_before=rows[-1].id if len(rows) == PAGE_SIZE else None,
        duration=duration,
        human=human,
        usage=usage,
        user=_access().user(),
    )


@bp.get("/runs/<int:run_id>")
def run_page(run_id: int) -> str:
    ui = _ui()
    run, found = _visible_run(run_id)
    lines, total = ui.store.log_tail(run_id, LOG_TAIL_LINES)
    events = ui.store.events(run_id, without=["log"])
    states = [e for e in events if e.kind == "state"]
    others = [e for e in events if e.kind not in {"state", "log"}]
    # The stream resumes after the newest row the page already holds, whatever its kind.
    after = max([e.id for e in events] + [r.id for r in lines] + [0])
    # A result refused for carrying a secret value is the operator's to read on the server
    # (`trimo runs show ID --patch`), never the page's to serve.
    withheld = bool((run.report or {}).get("secrets"))
    return render_template(
        "run.html",
        run=run,
        pipeline=found,
        phases=timeline(run, states),
        lines=lines,
        hidden_lines=total - len(lines),
        events=others,
        after=after,
        withheld=withheld,
        commits=commit_diffs(ui.settings, found, run) if run.commits and not withheld else [],
        links=links(found),
        usage=usage(run),
        can_act=_access().can_act(found.repo),
        min_permission=ui.settings.min_permission,
        duration=duration,
        human=human,
        user=_access().user(),
        live=not run.finished,
        denials=[e for e in others if e.kind == EGRESS_DENIED],
    )


@bp.get("/runs/<int:run_id>/log.txt")
def log_text(run_id: int) -> Response:
    ui = _ui()
    _visible_run(run_id)

    def lines() -> Iterator[str]:
        after = 0
        while rows := ui.store.events(run_id, after_id=after, kinds=["log"], limit=5000):
            after = rows[-1].id
            yield "".join(r.message + "\n" for r in rows)

    return Response(lines(), mimetype="text/plain")


def sse(row: RunEventRow) -> str:
    """One stored row as a Server-Sent Event: log lines as `log` events, every other kind as
    a plain message carrying its kind, so kinds added later show without a page change."""
    if row.kind == "log":
        return f"id: {row.id}\nevent: log\ndata: {json.dumps(row.message)}\n\n"
    data = {"kind": row.kind, "message": row.message, "data": row.data}
    return f"id: {row.id}\ndata: {json.dumps(data)}\n\n"


@bp.get("/runs/<int:run_id>/events")
def run_events(run_id: int) -> Response:
    """The run's log and events as Server-Sent Events. Each event's id is the stored row's id,
    so a browser that reconnects (Last-Event-ID) gets exactly the rows it has not seen."""
    ui = _ui()
    _visible_run(run_id)
    resume = request.headers.get("Last-Event-ID", "")
    after = int(resume) if resume.isdigit() else request.args.get("after", 0, type=int)

    if not ui.streams.acquire(blocking=False):
        # Every stream slot is taken: the browser reconnects (same Last-Event-ID) a bit later.
        return Response(BUSY_RETRY, mimetype="text/event-stream")

    def stream() -> Iterator[str]:
        try:
            yield "retry: 500\n\n"
            # One write per batch of rows, not per row: fifty followers of a busy log would
            # otherwise cost fifty small writes per line.
            for batch in ui.hub.follow(run_id, after, max_seconds=ui.stream_seconds):
                yield "".join(sse(row) for row in batch) if batch else ": still running\n\n"
            if ui.store.get_run(run_id).finished:
                yield "event: end\ndata: {}\n\n"
        finally:
            ui.streams.release()

    return Response(
        stream(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---- buttons ------------------------------------------------------------------------------


def _acting_on(run_id: int) -> tuple[Run, Pipeline, str]:
    run, found = _visible_run(run_id)
    access = _access()
    if not access.can_act(found.repo):
        abort(403, NOT_ALLOWED.format(minimum=_ui().settings.min_permission, repo=found.repo))
    return run, found, access.user() or "someone"


@bp.post("/runs/<int:run_id>/stop")
def stop(run_id: int) -> BaseResponse:
    run, _, user = _acting_on(run_id)
    store = _ui().store
    why = STOPPED_HERE.format(user=user)
    if not run.finished:
        store.cancel_run(run_id, why)
    flash(f"Run {run_id}: stop requested.")
    return redirect(url_for("ui.run_page", run_id=run_id))


def _again(run_id: int, mode: RunMode) -> BaseResponse:
    run, found, user = _acting_on(run_id)
    new = dispatch(
        _ui().store,
        found,
        trigger="run page",
        task=run.task,
        mode=mode,
        sender=user,
        instructions=run.instructions,
        agent_command=run.agent_command,
        head_sha=run.head_sha if found.kind == PipelineKind.PULL else None,
    )
    flash(f"Run {new.id} queued.")
    return redirect(url_for("ui.run_page", run_id=new.id))


@bp.post("/runs/<int:run_id>/retry")
def retry(run_id: int) -> BaseResponse:
    return _again(run_id, RunMode.AGENT)


@bp.post("/runs/<int:run_id>/test")
def tests_only(run_id: int) -> BaseResponse:
    return _again(run_id, RunMode.TESTS)
