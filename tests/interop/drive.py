"""Runs the interop conversation of each third-party client over TCP and
over the Unix socket, each against a broker of its own (the conversation
ends with the broker's shutdown). Standard library only."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

PATIENCE_S = 60


def start_broker(binary: str, directory: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    env = dict(os.environ)
    env.pop("GPULEASE_CONFIG", None)
    env.update(
        {
            "GPULEASE__LISTEN": "127.0.0.1:0",
            "GPULEASE__SOCKET": os.path.join(directory, "gpulease.sock"),
            "GPULEASE__STATE_DIR": os.path.join(directory, "state"),
            "GPULEASE__GPU__SOURCE": "static",
            "RUST_LOG": "info",
        }
    )
    broker = subprocess.Popen(
        [binary, "serve"], env=env, stdout=subprocess.PIPE, text=True, stderr=sys.stderr
    )
    assert broker.stdout is not None
    addresses: dict[str, str] = {}
    deadline = time.monotonic() + PATIENCE_S
    while len(addresses) < 2 and time.monotonic() < deadline:
        line = broker.stdout.readline()
        if not line:
            raise SystemExit("interop: the broker exited before it listened")
        if line.startswith("listening on "):
            address = line[len("listening on ") :].strip()
            addresses["unix" if address.startswith("unix:") else "tcp"] = address
    # Keep reading its stdout, so that it never writes into a closed pipe.
    threading.Thread(target=broker.stdout.read, daemon=True).start()
    return broker, addresses


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--node-modules", required=True)
    parser.add_argument("--python", required=True)
    parser.add_argument("--repo", required=True)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    proto = os.path.join(args.repo, "proto")
    lease_pb2 = os.path.join(args.repo, "clients/python/src/gpulease/v1/lease_pb2.py")
    clients = {
        "grpc-js": lambda address, pid: ["node", os.path.join(here, "conversation.js"), address, pid, proto],
        "grpclib": lambda address, pid: [
            args.python,
            os.path.join(here, "conversation_grpclib.py"),
            address,
            pid,
            lease_pb2,
        ],
    }
    failures = []
    for name, command in clients.items():
        for transport in ("tcp", "unix"):
            with tempfile.TemporaryDirectory() as directory:
                broker, addresses = start_broker(args.bin, directory)
                env = dict(os.environ, NODE_PATH=args.node_modules)
                print(f"\n-- {name} over {transport} ({addresses[transport]})", flush=True)
                try:
                    client = subprocess.run(
                        command(addresses[transport], str(broker.pid)),
                        env=env,
                        timeout=PATIENCE_S,
                    )
                    code = client.returncode
                except subprocess.TimeoutExpired:
                    code = "timed out"
                try:
                    exit_code = broker.wait(timeout=PATIENCE_S)
                except subprocess.TimeoutExpired:
                    broker.kill()
                    exit_code = "still running"
                if code != 0 or exit_code != 0:
                    failures.append(f"{name} over {transport}: client {code}, broker {exit_code}")
                else:
                    print(f"-- {name} over {transport}: passed", flush=True)
    if failures:
        print("\ninterop failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\ninterop: 4 conversations passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
