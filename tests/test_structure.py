"""The package's shape: stages never import each other, the library never imports the CLI, the
wheel claims one top-level name, and planning (`status`, `--help`) loads no model."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from shipyard.cli import app
from shipyard.pipeline import registry
from shipyard.pipeline.heads import BUILDERS
from shipyard.stages.runner import STAGES
from typer.testing import CliRunner

from tests.conftest import manifest_dict, write_manifest

ROOT = Path(__file__).resolve().parent.parent
STAGE_MODULES = {p.stem for p in (ROOT / "stages").glob("*.py")
                 if "\nSTAGE = Stage(" in p.read_text()}


def _imports(path: Path) -> set[str]:
    """Every module a file imports (and every name it imports from one), named inside the
    package: 'stages.extract', 'pipeline.store.FeatureStore', ..."""
    package = path.parent.name  # pipeline | stages
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.removeprefix("shipyard.") for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = [package] if node.level == 1 else []
            module = (node.module or "").removeprefix("shipyard.") if node.level != 1 else \
                node.module or ""
            target = ".".join(p for p in [*parts, module] if p)
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return out


def test_every_declared_stage_is_in_the_pipeline() -> None:
    assert {s.name.replace("-", "_") for s in STAGES} == STAGE_MODULES
    assert len(STAGE_MODULES) == 7


@pytest.mark.parametrize("module", sorted(STAGE_MODULES))
def test_no_stage_module_imports_another(module: str) -> None:
    imported = _imports(ROOT / "stages" / f"{module}.py")
    others = {f"stages.{m}" for m in STAGE_MODULES - {module}}
    assert not imported & others, imported & others


def test_the_library_never_imports_stages_or_the_cli() -> None:
    for path in (ROOT / "pipeline").glob("*.py"):
        imported = _imports(path)
        assert not {i for i in imported if i.startswith(("stages", "cli"))}, path.name
        assert "typer" not in path.read_text(), path.name


def test_registries_name_exactly_the_built_heads() -> None:
    assert set(registry.heads()) == set(BUILDERS)
    stages = {s.name for s in STAGES}
    assert {h.stage for h in registry.heads().values() if h.stage} <= stages


def test_wheel_holds_only_the_shipyard_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "cli.py", "cli_text.py", "__main__.py"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("shipyard-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"shipyard"}
    assert "shipyard/cli.py" in names and "shipyard/__main__.py" in names
    assert "shipyard/pipeline/presets/heads.json" in names
    assert "shipyard/pipeline/model_configs/shipyard-tiny.json" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "shipyard = shipyard.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_help_and_version_import_no_torch() -> None:
    code = ("import sys\nfrom shipyard.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
    version = subprocess.run([sys.executable, "-m", "shipyard", "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.startswith("shipyard ")
    assert CliRunner().invoke(app, ["-h"]).exit_code == 0


def test_a_second_status_builds_no_model_and_imports_no_torch(tmp_path: Path,
                                                              small_demo: Path) -> None:
    path = write_manifest(tmp_path / "m.yaml", manifest_dict(small_demo, tmp_path / "s.zarr"))
    assert CliRunner().invoke(app, ["--manifest", str(path), "extract"]).exit_code == 0
    code = ("import sys, json\nfrom shipyard.cli import app\n"
            f"try:\n    app(['--manifest', {str(path)!r}, 'status', '--json'])\n"
            "except SystemExit:\n    pass\n"
            "print(json.dumps(['torch' in sys.modules, 'open_clip' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == [False, False]
    status = json.loads(lines[0])
    assert status["datasets"][0]["missing_features"] == 0  # it did read the store


@pytest.mark.parametrize("bench", sorted(p.stem for p in (ROOT / "bench").glob("*.py")))
def test_every_benchmark_imports_against_the_current_api(bench: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{bench}", ROOT / "bench" / f"{bench}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports only: main() runs under __main__
    assert callable(module.main)


STRAY = '''
import os
from pathlib import Path

def test_writes_outside_its_folder():
    (Path.home() / ".cache" / "stray").mkdir(parents=True)
    os.environ["SHIPYARD_LEAKED"] = "1"
'''


def test_a_test_writing_into_home_or_leaking_environment_fails_the_session(tmp_path: Path) -> None:
    """The session guard (tests/write_guard.py, loaded by tests/conftest.py): HOME points into an
    empty folder of the session, and whatever lands there, or stays changed in os.environ, fails
    the run by name."""
    (tmp_path / "test_stray.py").write_text(STRAY)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pyproject.toml"),
                          "-p", "no:cacheprovider", "-p", "tests.write_guard",
                          str(tmp_path / "test_stray.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 passed" in out.stdout
    assert "wrote into the home folder: .cache/stray" in out.stderr
    assert "left the environment changed: SHIPYARD_LEAKED" in out.stderr
    assert not (Path.home() / ".cache" / "stray").exists()
