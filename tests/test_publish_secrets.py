"""`trimo run` refuses to publish commits that carry a secret value the run was given."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from markupsafe import escape

from bot.settings import Settings
from bot.states import RunState
from tests.containers import git, make_repo
from tests.test_run_engine import Trimo, branches
from ui.app import create_app

pytestmark = pytest.mark.docker

NAME = "DEPLOY_TOKEN"
# Special characters on purpose: its URL-encoded form differs from it; no slash (a file name).
VALUE = "dpl-Zq9xT4+uV7 w=pass"
CONFIG = f"agent:\n  secrets: [{NAME}]\n"
COMMIT = "git add -A && git commit -qm 'Add the work'"
LEAKS = {
    "plain": (f'echo "token=${NAME}" > leaked.txt; {COMMIT}', "leaked.txt line 1"),
    "base64": (
        f'printf "config\\n"> enc.txt; printf %s "${NAME}" | base64 -w0 >> enc.txt; {COMMIT}',
        "base64-encoded (commit {sha}, added line enc.txt line 2)",
    ),
    "url": (
        "python3 -c 'import os, urllib.parse; "
        f'print("u=" + urllib.parse.quote(os.environ["{NAME}"], safe=""))\' > u.txt; {COMMIT}',
        "url-encoded (commit {sha}, added line u.txt line 1)",
    ),
    "commit message": (
        f'echo work > work.txt && git add work.txt && git commit -qm "Use ${NAME}"',
        "(commit {sha}, commit message)",
    ),
    "file name": (f'echo x > "cfg-${NAME}.txt"; {COMMIT}', "file name cfg-"),
    "binary": (
        f"printf '\\x00\\x01\\xff' > blob.bin; printf %s \"${NAME}\" >> blob.bin; "
        f"printf '\\x00\\xfe' >> blob.bin; {COMMIT}",
        "(commit {sha}, added line blob.bin line 1)",
    ),
}
VARIANTS = [
    VALUE,
    base64.b64encode(VALUE.encode()).decode(),
    quote(VALUE, safe=""),
    VALUE.encode().hex(),
]


@pytest.fixture
def trimo(tmp_path: Path, base_image: str) -> Trimo:
    return Trimo(tmp_path / "data")


def bare_remote(tmp_path: Path, config: str) -> Path:
    work = tmp_path / "work"
    make_repo(work, {"README.md": "# app\n", ".trimo/config.yml": config})
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(remote)], check=True)
    return remote


@pytest.mark.parametrize("leak", list(LEAKS))
def test_a_secret_in_the_result_is_not_pushed_and_the_run_is_rejected(
    trimo: Trimo, tmp_path: Path, leak: str
) -> None:
    remote = bare_remote(tmp_path, CONFIG)
    before = git(remote, "for-each-ref")
    agent, where = LEAKS[leak]
    r = trimo(
        "run",
        "--repo",
        str(remote),
        "--task",
        "Leak",
        "--agent",
        agent,
        TRIMO_SECRET_DEPLOY_TOKEN=VALUE,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    store = trimo.store()
    run = store.get_run(1)
    assert run.state == RunState.REJECTED
    # Nothing reached the remote: not a branch, not a ref.
    assert git(remote, "for-each-ref") == before
    assert [b for b in branches(remote) if b.startswith("trimo/")] == []
    head = (run.report or {})["result"]["head"]
    assert f"secret {NAME}" in r.stdout and where.format(sha=head[:12]) in r.stdout, r.stdout
    assert "trimo runs show 1 --patch" in (run.reason or "")

    shown = trimo("runs", "show", "1", "--json").stdout + trimo("runs", "logs", "1").stdout
    stored = [f"{e.kind} {e.message} {e.data}" for e in store.events(1)]
    everything = "\n".join([r.stdout, r.stderr, shown, *stored, str(run.report), run.reason or ""])
    for variant in VARIANTS:
        assert variant not in everything

    # The run's page names the refusal but serves none of the commits' content.
    page = create_app(Settings(data_dir=trimo.data_dir), store).test_client().get("/runs/1")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Not shown: the commits hold the value of a secret" in html
    for variant in VARIANTS:
        assert variant not in html and escape(variant) not in html

    # The work stays with the run: the operator can read it.
    patch = subprocess.run(
        [*trimo_cmd(), "runs", "show", "1", "--patch"],
        env=trimo.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert patch.returncode == 0, patch.stderr
    assert head.encode() in patch.stdout
    if leak == "plain":
        assert f"+token={VALUE}".encode() in patch.stdout


def trimo_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "bot"]


def test_a_timed_out_checkpoint_with_a_secret_is_not_pushed(trimo: Trimo, tmp_path: Path) -> None:
    remote = bare_remote(tmp_path, CONFIG + "timeout: 10s\n")
    r = trimo(
        "run",
        "--repo",
        str(remote),
        "--task",
        "Slow leak",
        "--agent",
        f'echo "${NAME}" > draft.txt; sleep 300',
        TRIMO_SECRET_DEPLOY_TOKEN=VALUE,
    )
    assert r.returncode == 1
    assert trimo.store().get_run(1).state == RunState.REJECTED, r.stdout
    assert "draft.txt line 1" in r.stdout and VALUE not in r.stdout
    assert [b for b in branches(remote) if b.startswith("trimo/")] == []


def test_a_clean_result_of_a_run_with_secrets_is_published(trimo: Trimo, tmp_path: Path) -> None:
    remote = bare_remote(tmp_path, CONFIG)
    r = trimo(
        "run",
        "--repo",
        str(remote),
        "--task",
        "Use it, do not commit it",
        "--agent",
        f'echo "${NAME}" > /tmp/used; echo "uses the token" > notes.txt; {COMMIT}',
        TRIMO_SECRET_DEPLOY_TOKEN=VALUE,
    )
    assert r.returncode == 0, r.stdout
    assert trimo.store().get_run(1).state == RunState.SUCCEEDED
    branch = next(b for b in branches(remote) if b.startswith("trimo/"))
    assert git(remote, "show", f"{branch}:notes.txt") == "uses the token"


def test_a_secret_too_short_to_scan_for_stops_the_run_before_it_starts(
    trimo: Trimo, tmp_path: Path
) -> None:
    remote = bare_remote(tmp_path, "agent:\n  secrets: [PIN]\n")
    r = trimo("run", "--repo", str(remote), "--task", "x", "--agent", "true", PIN="4711")
    assert r.returncode == 1
    assert "secret PIN is 4 characters long; Trimo needs at least 8" in r.stdout
    assert trimo.store().get_run(1).container_id is None
