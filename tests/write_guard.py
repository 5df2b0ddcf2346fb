"""The session's write guard: tests never write outside their temporary folders.

For the session, the home folder and the XDG folders point into an empty folder of their own; at
the end that folder must still be empty, the repository hold no new file, and the environment be
as it was. A plugin of its own (tests/conftest.py imports its hooks) so that its own test can run
it on a stray test without shipyard's fixtures.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

ROOT = Path(__file__).resolve().parent.parent

# What a test run may leave in the repository: caches of Python and of the tools run on it.
TREE_CACHES = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".typecheck"}
HOME_VARS = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")


def tree_files(root: Path) -> set[str]:
    """Every file and folder under `root` but the caches, relative to it."""
    out = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in TREE_CACHES and not d.endswith(".egg-info")]
        rel = Path(folder).relative_to(root)
        out.update(str(rel / name) for name in dirs + files)
    return out


def pytest_configure(config: pytest.Config) -> None:
    """Point home into the session's folder and record the tree and the environment. (Not while
    mutmut runs the tests in its staging folder: it writes its own files there.)"""
    if "mutmut" in sys.modules:
        return
    import open_clip  # noqa: F401  its import sets two environment variables: record them as set
    session = Path(tempfile.mkdtemp(prefix="shipyard-tests-"))
    set_hypothesis_home_dir(session / "hypothesis")  # its caches, not in the working folder
    home = session / "home"
    home.mkdir()
    for var in HOME_VARS:
        os.environ[var] = str(home if var == "HOME" else home / var.lower())
    # Module-scoped fixtures start before each test's own stat cache: theirs is the session's.
    os.environ["SHIPYARD_CACHE_DIR"] = str(session / "cache")
    for var in ("RUSTUP_HOME", "CARGO_HOME"):  # tool proxies that a build may call write there
        os.environ.setdefault(var, str(session / var.lower()))
    config._write_guard = (home, tree_files(ROOT), dict(os.environ))  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    guard = getattr(session.config, "_write_guard", None)
    if guard is None:
        return
    home, before, environ = guard
    session.config._write_guard = None  # type: ignore[attr-defined]
    problems = [f"wrote into the home folder: {p}" for p in sorted(tree_files(home))[:10]]
    problems += [f"wrote into the repository: {p}" for p in sorted(tree_files(ROOT) - before)[:10]]
    changed = sorted(k for k in set(environ) | set(os.environ) if environ.get(k) != os.environ.get(k))
    problems += [f"left the environment changed: {k}" for k in changed if k != "PYTEST_CURRENT_TEST"]
    shutil.rmtree(home.parent, ignore_errors=True)
    if problems:
        print("\ntests wrote outside their temporary folders:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
