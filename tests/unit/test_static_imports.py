"""Import path equals file path: a static checker, run on the checkout with no installed package and
no import hook (mypy with only libs/ on its search path and site-packages off), resolves every
`splitserve.*` import of the package, the services, the tests and the benchmarks.

Third-party modules are then unresolvable by construction (site-packages is off), so only errors
that name a `splitserve` module count. The negative control proves the check can fail.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBS = REPO / "libs"

# mypy's two ways of saying an import does not resolve
_UNRESOLVED = re.compile(r'error: (Cannot find implementation or library stub for module named "splitserve[^"]*"'
                         r'|Module "splitserve[^"]*" has no attribute "[^"]+")')


def _mypy(cache_dir: Path, *targets: str) -> tuple[list[str], str]:
    """Runs mypy by file path only; returns the unresolved-splitserve-import errors and the output."""
    cmd = [sys.executable, "-m", "mypy", "--no-site-packages", "--follow-imports=silent", "--explicit-package-bases",
           "--show-error-codes", "--cache-dir", str(cache_dir), *targets]
    proc = subprocess.run(cmd, cwd=REPO, env={"MYPYPATH": str(LIBS), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    # mypy exits 2 on a crash or bad usage (1 just means it found type errors, which are not ours here)
    assert proc.returncode in (0, 1), f"mypy failed to run ({proc.returncode}):\n{out[-3000:]}"
    return [line for line in out.splitlines() if _UNRESOLVED.search(line)], out


def _package_modules() -> set[tuple[str, str]]:
    found = set()
    for root, _dirs, files in os.walk(LIBS / "splitserve", followlinks=True):
        found.update((root, Path(f).stem) for f in files if f.endswith((".py", ".pyi")))
    return found


def test_every_splitserve_import_resolves_by_file_path(tmp_path):
    others = sorted(str(p.relative_to(REPO)) for folder in ("tests", "benchmarks") for p in (REPO / folder).rglob("*.py"))
    unresolved, out = _mypy(tmp_path / "cache", "libs/splitserve", *others)
    checked = re.search(r"\(checked (\d+) source files\)", out)
    # mypy read every module: the package's (services through the symlink; a .pyi stands for its .py)
    # and the tests' and benchmarks'
    assert checked and int(checked.group(1)) == len(_package_modules()) + len(others), out[-2000:]
    assert unresolved == [], "imports a static checker cannot resolve:\n" + "\n".join(unresolved)


def test_the_check_catches_an_import_that_does_not_resolve(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import splitserve.no_such_module\n"
                     "from splitserve.engine import no_such_name\n"
                     "from splitserve.engine.scheduler import Scheduler\n")
    unresolved, _ = _mypy(tmp_path / "cache", str(probe))
    assert len(unresolved) == 2, unresolved
    assert "splitserve.no_such_module" in unresolved[0] and "no_such_name" in unresolved[1]


def test_the_package_is_the_folder():
    import splitserve.engine.scheduler as scheduler
    import splitserve.services.gateway.server as gateway

    assert Path(scheduler.__file__).resolve() == LIBS / "splitserve" / "engine" / "scheduler.py"
    # the role shells stay in services/<role>/, reached through the symlink libs/splitserve/services
    assert Path(gateway.__file__).resolve() == REPO / "services" / "gateway" / "server.py"
    assert (LIBS / "splitserve" / "services").is_symlink()
