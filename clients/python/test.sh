#!/usr/bin/env bash
# Tests the Python client and grpcurl against the real broker binary.
#
# Creates (or reuses) the virtualenv target/py-venv, installs the pinned test
# tools and `pip install ./clients/python` into it, fails if the committed
# gRPC stubs are stale, runs `ruff check` and `mypy` (strict, configured in
# pyproject.toml) over the client, its tests and generate.py, builds the
# broker if target/debug/gpulease is missing, and runs pytest. Arguments go
# to pytest. Environment:
#   PYTHON        the interpreter that makes the virtualenv (default python3)
#   GPULEASE_BIN  the broker binary to test (default target/debug/gpulease)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/target/py-venv"
py="$venv/bin/python"

step() { printf '\n--> %s\n' "$*"; }

if [ ! -x "$py" ]; then
  step "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi

step "installing the pinned test tools and ./clients/python"
"$py" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-test.txt"
# Built and installed as a user would, so that the tests import the installed
# package (src layout) and not the source tree. setuptools' build/ folder is
# removed first: it would carry files deleted from src/ into the wheel.
rm -rf "$here/build"
"$py" -m pip install --quiet --disable-pip-version-check "$here"

step "checking that the committed stubs match proto/"
"$py" "$here/generate.py" --check

# Their caches go to target/, as pytest's is off: nothing lands in the source tree.
step "ruff check"
(cd "$here" && "$venv/bin/ruff" check --cache-dir "$repo/target/ruff-cache" .)

step "mypy --strict"
(cd "$here" && "$py" -m mypy --cache-dir "$repo/target/mypy-cache")

if [ -z "${GPULEASE_BIN:-}" ] && [ ! -x "$repo/target/debug/gpulease" ]; then
  step "building the broker"
  (cd "$repo" && cargo build --bins --locked)
fi

step "pytest"
cd "$here"
exec "$py" -m pytest "$@"
