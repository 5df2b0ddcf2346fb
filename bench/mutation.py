"""Mutation testing per module: mutmut mutates one module at a time and runs the tests that pin
it (pyproject.toml, [tool.shipyard.mutation]); survivors reviewed as equivalent, GPU-only or
message text are listed with a reason in bench/mutation_accepted.tsv. Prints, per module,
mutants, killed (failed, timed out or crashed), how many of those timed out, survived, accepted,
open survivors and the score killed / (mutants - accepted), then every open survivor's line.

    bash bench/mutation.sh                         # every module listed in pyproject.toml
                                                   # (but those marked default = false)
    bash bench/mutation.sh pipeline/metrics.py     # one module
    bash bench/mutation.sh --report-only           # the last run's table, after a review
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCEPTED = ROOT / "bench" / "mutation_accepted.tsv"
# A mutant whose tests fail, hang past mutmut's timeout or crash the test process is caught.
CAUGHT = {"killed", "timeout", "segfault"}


class Outcome:
    """One module's mutants: their status, each survivor's mutated line, and the run's seconds."""

    def __init__(self, module: str, seconds: float = 0.0) -> None:
        self.module, self.seconds = module, seconds
        self.status: dict[str, str] = {}  # mutant name -> killed, survived, timeout, ...
        self.diffs: dict[str, str] = {}  # survivor -> its mutated line


def toml_value(value: object) -> str:
    """A TOML literal for the strings, booleans, numbers and lists the config holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def stage(module: str, tests: list[str], where: Path, config: dict) -> None:
    """The repository as `shipyard/` beside `tests/`, with a pyproject that mutates `module`."""
    if where.exists():
        shutil.rmtree(where)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if not src.is_file():
            continue
        # The tests find the demo data beside themselves: examples/ goes to both places.
        tops = [""] if name.startswith("tests/") else ["shipyard", ""] if name.startswith(
            "examples/") else ["shipyard"]
        for top in tops:
            dst = where / top / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    mutmut = {**config["tool"]["mutmut"], "only_mutate": [f"shipyard/{module}"],
              "pytest_add_cli_args_test_selection": tests}
    pytest_opts = config["tool"]["pytest"]["ini_options"]
    lines = ["[tool.mutmut]", *(f"{k} = {toml_value(v)}" for k, v in mutmut.items()), "",
             "[tool.pytest.ini_options]", *(f"{k} = {toml_value(v)}" for k, v in pytest_opts.items())]
    (where / "pyproject.toml").write_text("\n".join(lines) + "\n")


def run_module(module: str, tests: list[str], work: Path, config: dict,
               rerun: bool = True) -> Outcome:
    """Mutate one module in its staging folder and collect the verdicts; without `rerun`, only
    collect those of the last run there (to re-print the table after reviewing survivors)."""
    where = work / module.replace("/", "_").removesuffix(".py")
    env = {**os.environ, "SHIPYARD_CACHE_DIR": str(where / "stat-cache"), "OMP_NUM_THREADS": "1"}
    if rerun:
        stage(module, tests, where, config)
        start = time.perf_counter()
        with open(where / "mutmut.log", "w") as log:
            subprocess.run(["mutmut", "run"], cwd=where, env=env, stdout=log,
                           stderr=subprocess.STDOUT, check=False)
        (where / "seconds").write_text(f"{time.perf_counter() - start:.1f}\n")
    elif not (where / "seconds").is_file():
        sys.exit(f"{module}: no finished run in {where} (run without --report-only first)")
    out = Outcome(module, seconds=float((where / "seconds").read_text()))
    listing = subprocess.run(["mutmut", "results", "--all", "true"], cwd=where, env=env,
                             capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            out.status[name] = status
    for name, status in out.status.items():
        if status not in CAUGHT:
            shown = subprocess.run(["mutmut", "show", name], cwd=where, env=env,
                                   capture_output=True, text=True, check=False).stdout
            out.diffs[name] = next((ln[1:].strip() for ln in shown.splitlines()
                                    if ln.startswith("+") and not ln.startswith("+++")), "?")
    return out


def read_accepted() -> dict[str, tuple[str, str]]:
    """name -> (mutated line, reason) of every reviewed survivor."""
    out = {}
    for line in ACCEPTED.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, mutated, reason = line.split("\t")
            out[name] = (mutated, reason)
    return out


def report(outcomes: list[Outcome], accepted: dict[str, tuple[str, str]]) -> None:
    head = (f"{'module':<28}{'mutants':>8}{'killed':>8}{'timeout':>8}{'survived':>9}{'accepted':>9}"
            f"{'open':>6}{'score':>8}{'seconds':>9}")
    print(head)
    print("-" * len(head))
    open_rows: list[str] = []
    for o in outcomes:
        survived = [n for n, s in o.status.items() if s not in CAUGHT]
        ok = [n for n in survived if n in accepted and accepted[n][0] == o.diffs.get(n)]
        killed = sum(s in CAUGHT for s in o.status.values())
        judged = len(o.status) - len(ok)
        score = 100.0 * killed / judged if judged else 100.0
        timeouts = sum(s == "timeout" for s in o.status.values())  # among killed; many: a busy machine
        print(f"{o.module:<28}{len(o.status):>8}{killed:>8}{timeouts:>8}{len(survived):>9}{len(ok):>9}"
              f"{len(survived) - len(ok):>6}{score:>7.1f}%{o.seconds:>9.0f}")
        open_rows += [f"  {n} [{o.status[n]}]: {o.diffs.get(n)}" for n in survived if n not in ok]
        prefix = "shipyard." + o.module.removesuffix(".py").replace("/", ".") + "."
        stale = [n for n in accepted if n.startswith(prefix) and n not in ok]
        open_rows += [f"  {n}: accepted but no longer this survivor (review the entry)"
                      for n in stale]
    if open_rows:
        print("\nopen survivors (a test should kill them, or they join "
              f"{ACCEPTED.relative_to(ROOT)} with a reason):")
        print("\n".join(open_rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", help="module paths as in pyproject.toml (default: all)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "shipyard-mutation",
                   help="staging folder (one subfolder per module, replaced on each run)")
    p.add_argument("--report-only", action="store_true",
                   help="re-print the table from the last run in --work, mutating nothing")
    args = p.parse_args()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # module -> its tests; a module given as {tests = [...], default = false} runs only by name
    entries = config["tool"]["shipyard"]["mutation"]
    table = {m: e["tests"] if isinstance(e, dict) else e for m, e in entries.items()}
    defaults = [m for m, e in entries.items() if not isinstance(e, dict) or e.get("default", True)]
    unknown = [m for m in args.modules if m not in table]
    if unknown:
        p.error(f"not in [tool.shipyard.mutation]: {', '.join(unknown)} (known: {', '.join(table)})")
    if shutil.which("mutmut") is None:
        sys.exit("mutmut is not installed: pip install -e '.[dev]'")
    outcomes = []
    for module in args.modules or defaults:
        print(f"{'reading' if args.report_only else 'mutating'} {module} ...", file=sys.stderr,
              flush=True)
        outcomes.append(run_module(module, table[module], args.work, config,
                                   rerun=not args.report_only))
    report(outcomes, read_accepted())


if __name__ == "__main__":
    main()
