"""The bundled sample repository: the Django example with a bug, and a command agent that fixes it.

`trimo demo` and the tests use it to show a whole run without GitHub and without an agent
vendor's key: a Postgres-backed test fails on the default branch, the agent finds and fixes the
bug, the tests pass against the container's own Postgres, and the fix lands on a branch.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bot.images import images_dir

EXAMPLE = "django-postgres-celery"
BUG_FILE = "pages/models.py"
GOOD_LINE = "self.slug = slug_for(self.title)"
BAD_LINE = "self.slug = self.title.lower()"
TASK = """Page slugs are wrong

Saving a page titled "Getting Started" gives it the slug "getting started" instead of
"getting-started", so `tests/test_models.py` fails. Fix it and keep the tests green.
"""
# A scripted agent: run the failing test, find the bad line, fix it, commit, check again.
AGENT = (
    "python3 -m pytest -q tests/test_models.py || true; "
    "grep -n 'self.title.lower()' pages/models.py && "
    "sed -i 's/self.slug = self.title.lower()/self.slug = slug_for(self.title)/' "
    "pages/models.py && "
    "git commit -qam 'Build page slugs with slug_for' && "
    "echo 'Page.save built slugs by lowercasing the title; it now uses slug_for.' "
    '> "$TRIMO_SUMMARY_FILE" && '
    "python3 -m pytest -q tests/test_models.py"
)
AUTHOR_ENV = {
    "GIT_AUTHOR_NAME": "Sample Maintainer",
    "GIT_AUTHOR_EMAIL": "maintainer@example.test",
    "GIT_COMMITTER_NAME": "Sample Maintainer",
    "GIT_COMMITTER_EMAIL": "maintainer@example.test",
}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(repo), **AUTHOR_ENV},
    )


def make_sample_repo(dest: Path, with_bug: bool = True) -> Path:
    """A git repository at `dest` holding the Django example; with the bug committed on top."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(
        images_dir() / "examples" / EXAMPLE,
        dest,
        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.pyc"),
    )
    _git(dest, "init", "-q", "-b", "main")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "Django example: pages with slugs, Celery tasks")
    if with_bug:
        models = dest / BUG_FILE
        text = models.read_text()
        if GOOD_LINE not in text:
            raise RuntimeError(f"{BUG_FILE} of the example no longer has {GOOD_LINE!r}")
        models.write_text(text.replace(GOOD_LINE, BAD_LINE))
        _git(dest, "commit", "-q", "-am", "Simplify slug building")
    return dest
