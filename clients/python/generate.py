#!/usr/bin/env python3
"""Generates the Python client's gRPC stubs from the repo's proto/.

    python clients/python/generate.py          # rewrite the committed stubs
    python clients/python/generate.py --check  # fail if they are stale

Every ``*.proto`` under proto/ becomes ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` under src/, at the proto's own path: proto/gpulease/v1/
lease.proto becomes src/gpulease/v1/lease_pb2.py, which is where the
generated ``from gpulease.v1 import lease_pb2`` finds it.

It runs with the grpcio-tools that requirements-test.txt pins and refuses any
other version, since the generator's version decides what the stubs need at
run time (see pyproject.toml). clients/python/test.sh runs it with --check.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO_ROOT = REPO / "proto"
OUT = HERE / "src"
REQUIREMENTS = HERE / "requirements-test.txt"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def pinned_generator() -> str:
    """The grpcio-tools version that requirements-test.txt pins."""
    match = re.search(r"^grpcio-tools==(\S+)", REQUIREMENTS.read_text(), re.MULTILINE)
    if match is None:
        sys.exit(f"{REQUIREMENTS} pins no grpcio-tools version")
    return match.group(1)


def generate(proto_root: Path, into: Path) -> None:
    """Runs protoc with the Python, .pyi and gRPC plugins into `into`."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--python_out={into}",
        f"--pyi_out={into}",
        f"--grpc_python_out={into}",
        *(str(p) for p in sorted(proto_root.rglob("*.proto"))),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def generated_files(root: Path) -> dict[str, bytes]:
    """The generated files under `root`, by path relative to it."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary folder and fail if the committed stubs differ",
    )
    parser.add_argument(
        "--proto",
        type=Path,
        default=PROTO_ROOT,
        help="the folder of the .proto files (default: the repository's proto/)",
    )
    args = parser.parse_args()

    pinned = pinned_generator()
    installed = importlib.metadata.version("grpcio-tools")
    if installed != pinned:
        print(
            f"generate.py: grpcio-tools {installed} is installed, but the stubs are generated"
            f" with {pinned} (requirements-test.txt); run clients/python/test.sh, or"
            f" pip install grpcio-tools=={pinned}",
            file=sys.stderr,
        )
        return 2

    with tempfile.TemporaryDirectory(prefix="gpulease-stubs-") as tmp:
        fresh_root = Path(tmp)
        generate(args.proto.resolve(), fresh_root)
        fresh = generated_files(fresh_root)
        committed = generated_files(OUT)
        if args.check:
            return check(fresh, committed)
        for name in sorted(set(committed) - set(fresh)):
            (OUT / name).unlink()
            print(f"removed {OUT / name}")
        for name, content in fresh.items():
            target = OUT / name
            target.parent.mkdir(parents=True, exist_ok=True)
            init = target.parent / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from the proto by generate.py."""\n')
            if committed.get(name) != content:
                target.write_bytes(content)
                print(f"wrote {target}")
    return 0


def check(fresh: dict[str, bytes], committed: dict[str, bytes]) -> int:
    """Compares fresh stubs with the committed ones; prints what differs."""
    names = set(fresh) | set(committed)
    stale = sorted(name for name in names if fresh.get(name) != committed.get(name))
    if not stale:
        print(f"generate.py --check: {len(fresh)} generated files are up to date with proto/")
        return 0
    for name in stale:
        old = committed.get(name, b"").decode(errors="replace").splitlines(keepends=True)
        new = fresh.get(name, b"").decode(errors="replace").splitlines(keepends=True)
        diff = list(difflib.unified_diff(old, new, f"committed/{name}", f"fresh/{name}"))
        sys.stderr.writelines(diff[:40])
        if len(diff) > 40:
            sys.stderr.write(f"... {len(diff) - 40} more diff lines\n")
    print(
        "generate.py --check: the committed stubs are stale (" + ", ".join(stale) + ");"
        " run `python clients/python/generate.py` and commit the result",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
