"""The house rules the layout keeps, checked on the files themselves: short files, thin role shells,
short functions, and the package's folders free of stray modules."""
from __future__ import annotations

import ast
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "libs" / "splitserve"
MAX_FILE_LINES = 450  # a hand-written module under libs/ or services/
MAX_SHELL_LINES = 200  # a services/<role>/ file: protobuf in, calls out
MAX_FUNCTION_LINES = 60  # a function on a request path (the benchmark client's CLI is not one)


def _sources() -> list[Path]:
    found = []
    for root, _dirs, files in os.walk(PACKAGE):  # the services symlink is not followed: listed below
        if Path(root).name != "v1":  # generated gRPC code
            found += [Path(root) / f for f in files if f.endswith(".py")]
    return sorted(found + list((REPO / "services").rglob("*.py")))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_the_limit():
    long = {str(p.relative_to(REPO)): _lines(p) for p in _sources() if _lines(p) > MAX_FILE_LINES}
    assert long == {}


def test_role_shells_stay_thin():
    thick = {str(p.relative_to(REPO)): _lines(p) for p in (REPO / "services").rglob("*.py")
             if _lines(p) > MAX_SHELL_LINES}
    assert thick == {}


def test_no_long_function_on_a_request_path():
    long = []
    for path in _sources():
        if PACKAGE / "bench" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_services_is_the_role_shells_reached_through_the_symlink():
    link = PACKAGE / "services"
    assert link.is_symlink() and os.readlink(link) == "../../services"
    roles = sorted(p.name for p in (REPO / "services").iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert roles == ["colocated", "decode", "gateway", "kvstore", "prefill"]
    for role in roles:
        assert (REPO / "services" / role / "server.py").is_file()
