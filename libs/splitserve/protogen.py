"""Generates the gRPC Python code in libs/splitserve/v1/ (package `splitserve.v1`) from protos/ with grpcio-tools.

    python -m splitserve.protogen            # regenerate in place
    python -m splitserve.protogen --check    # exit 1 when the checked-in code is stale

The .proto files live under protos/splitserve/v1/ so that the generated modules import each other
as `splitserve.v1.*_pb2`, which is where they are installed.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO_DIR = PROTO_ROOT / "splitserve" / "v1"
OUT_DIR = REPO / "libs" / "splitserve" / "v1"
INIT = '"""Generated gRPC code for package splitserve.v1 (python -m splitserve.protogen); do not edit."""\n'


def generate(out_dir: Path) -> list[str]:
    """Runs protoc into out_dir; returns the generated file names."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p) for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_DIR}")
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(protos)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        names = []
        for f in sorted((Path(tmp) / "splitserve" / "v1").iterdir()):
            shutil.copyfile(f, out_dir / f.name)
            names.append(f.name)
    (out_dir / "__init__.py").write_text(INIT)
    return names + ["__init__.py"]


def is_stale() -> list[str]:
    """Names of generated files that differ from a fresh generation (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = set(generate(Path(tmp)))
        have = {p.name for p in OUT_DIR.glob("*") if p.is_file() and p.suffix in (".py", ".pyi")}
        stale = sorted(fresh ^ have)
        stale += [n for n in sorted(fresh & have) if not filecmp.cmp(Path(tmp) / n, OUT_DIR / n, shallow=False)]
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    if args.check:
        stale = is_stale()
        if stale:
            print(f"stale generated code in {OUT_DIR}: {', '.join(stale)}; run python -m splitserve.protogen")
            return 1
        print("generated code is up to date")
        return 0
    for name in generate(OUT_DIR):
        print(OUT_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
