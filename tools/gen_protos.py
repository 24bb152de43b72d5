"""Compile protos/ into the package, or check that the committed modules are current.

The generated modules are committed so that a fresh clone (and a wheel) never needs a protoc step;
`--check` regenerates into a temporary directory and fails on any difference, so a .proto edited
without regenerating fails the tests instead of shipping a stale module.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _include_dirs() -> list[str]:
    import grpc_tools
    from google.rpc import status_pb2

    tools_include = Path(grpc_tools.__file__).parent / "_proto"
    # googleapis-common-protos ships google/rpc/status.proto beside its module; reuse it.
    common_root = Path(status_pb2.__file__).parent.parent.parent
    return [str(PROTOS), str(tools_include), str(common_root)]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = ["protoc", *(f"-I{d}" for d in _include_dirs())]
    args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every directory from `out` down to a generated module is a regular package, so that
    # setuptools ships it and imports never depend on namespace-package lookup.
    # Only the tree protoc wrote into: `out` may be the repository, whose .venv holds other
    # packages' generated modules that must not be touched.
    for directory, _dirs, files in os.walk(out / "authz_sidecar"):
        if any(f.endswith(SUFFIXES) for f in files):
            package = Path(directory)
            while package != out:
                init = package / "__init__.py"
                if not init.exists():
                    init.write_text("")
                package = package.parent


def generated_files(base: Path) -> set[Path]:
    return {p.relative_to(base) for p in base.rglob("*") if p.name.endswith(SUFFIXES)}


def check() -> list[str]:
    """Return the generated files that differ from a fresh generation (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected = generated_files(fresh)
        committed = generated_files(ROOT / "authz_sidecar")
        committed = {Path("authz_sidecar") / p for p in committed}
        problems = [f"missing: {p}" for p in sorted(expected - committed)]
        problems += [f"not generated from protos/: {p}" for p in sorted(committed - expected)]
        for rel in sorted(expected & committed):
            if not filecmp.cmp(fresh / rel, ROOT / rel, shallow=False):
                problems.append(f"stale: {rel}")
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed modules are stale")
    args = parser.parse_args()
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
