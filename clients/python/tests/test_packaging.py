"""The package as installed: runtime floors that match the generated code,
type information, and a stale-stub check that notices a changed proto."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gpulease
import gpulease.v1.lease_pb2 as lease_pb2
import gpulease.v1.lease_pb2_grpc as lease_pb2_grpc
from conftest import PATIENCE_S, REPO

CLIENT = REPO / "clients" / "python"
INSTALLED = Path(gpulease.__file__).resolve().parent


def generated_versions() -> tuple[str, str]:
    """(grpcio, protobuf) versions that the generated code asserts."""
    grpc_version = lease_pb2_grpc.GRPC_GENERATED_VERSION
    header = Path(lease_pb2.__file__).read_text()
    match = re.search(r"^# Protobuf Python Version: (\S+)$", header, re.MULTILINE)
    assert match is not None
    return grpc_version, match.group(1)


def test_the_runtime_floors_are_what_the_generated_code_asserts() -> None:
    grpc_version, protobuf_version = generated_versions()
    requires = importlib.metadata.requires("gpulease") or []
    assert f"grpcio>={grpc_version}" in requires
    assert f"protobuf>={protobuf_version}" in requires
    pinned = re.search(
        r"^grpcio-tools==(\S+)", (CLIENT / "requirements-test.txt").read_text(), re.MULTILINE
    )
    assert pinned is not None and pinned.group(1) == grpc_version


def test_the_tests_run_against_the_installed_package() -> None:
    assert "site-packages" in str(INSTALLED)
    for source in (CLIENT / "src" / "gpulease").rglob("*.py"):
        relative = source.relative_to(CLIENT / "src" / "gpulease")
        assert (INSTALLED / relative).read_bytes() == source.read_bytes(), (
            f"{relative} differs from the source: reinstall with clients/python/test.sh"
        )


def test_type_information_is_shipped() -> None:
    assert (INSTALLED / "py.typed").is_file()
    assert (INSTALLED / "v1" / "lease_pb2.pyi").is_file()


def test_the_stale_stub_check_notices_a_changed_proto(tmp_path: Path) -> None:
    proto = tmp_path / "proto"
    shutil.copytree(REPO / "proto", proto)
    check = [sys.executable, str(CLIENT / "generate.py"), "--check", "--proto", str(proto)]

    fresh = subprocess.run(check, capture_output=True, text=True, timeout=PATIENCE_S)
    assert fresh.returncode == 0, fresh.stderr

    lease_proto = proto / "gpulease" / "v1" / "lease.proto"
    lease_proto.write_text(lease_proto.read_text() + "\nmessage AddedLater {}\n")
    stale = subprocess.run(check, capture_output=True, text=True, timeout=PATIENCE_S)
    assert stale.returncode == 1
    assert "stale" in stale.stderr
    assert "AddedLater" in stale.stderr
