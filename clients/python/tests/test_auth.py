"""Bearer tokens, RevokeLease and TLS against the real broker: what the
client sends, where it finds its credentials, and how refusals surface."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List

import grpc
import pytest

import gpulease
import gpulease.aio
from conftest import PATIENCE_S, Broker, Certs, ended

TOKENS = """
[auth]
admin_token = "admin-secret"
{extra}

[consumers.tts]
token = "tts-secret"

[consumers.image]
token = "image-secret"
"""


def token_broker(start_broker: Callable[..., Broker], extra: str = "") -> Broker:
    """A broker where every consumer call needs a token."""
    return start_broker(config=TOKENS.format(extra=extra), client={"token": "admin-secret"})


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("GPULEASE_TOKEN", "GPULEASE_TOKEN_FILE", "GPULEASE_CA", "GPULEASE_CERT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GPULEASE_KEY", raising=False)
    return monkeypatch


def test_a_consumer_s_token_gets_its_lease(
    start_broker: Callable[..., Broker], clean_env: pytest.MonkeyPatch
) -> None:
    broker = token_broker(start_broker)
    with gpulease.lease("tts", broker=broker.address, token="tts-secret") as lease:
        (holder,) = broker.status().holders
        assert holder.lease_id == lease.lease_id
    # The admin token may act as anyone.
    with gpulease.lease("tts", broker=broker.address, token="admin-secret"):
        pass
    assert ended(broker.status())["released"] == 2


@pytest.mark.parametrize(
    "token, code",
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("guessed", grpc.StatusCode.UNAUTHENTICATED),
        ("image-secret", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_a_missing_unknown_or_foreign_token_is_unauthorized(
    start_broker: Callable[..., Broker],
    clean_env: pytest.MonkeyPatch,
    token: Any,
    code: grpc.StatusCode,
) -> None:
    broker = token_broker(start_broker)
    with pytest.raises(gpulease.LeaseUnauthorized) as raised:
        with gpulease.lease("tts", broker=broker.address, token=token, max_wait=5):
            pass
    assert isinstance(raised.value, gpulease.LeaseRejected)
    assert raised.value.code == code
    assert broker.status().total_grants == 0


def test_the_token_comes_from_the_environment_or_a_file(
    start_broker: Callable[..., Broker], clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broker = token_broker(start_broker)
    token_file = tmp_path / "tts.token"
    token_file.write_text("tts-secret\n")  # as `echo secret > file` writes it

    clean_env.setenv("GPULEASE_TOKEN_FILE", str(token_file))
    with gpulease.lease("tts", broker=broker.address):
        pass
    clean_env.setenv("GPULEASE_TOKEN", "tts-secret")
    clean_env.setenv("GPULEASE_TOKEN_FILE", "/nonexistent/file")  # $GPULEASE_TOKEN wins
    with gpulease.lease("tts", broker=broker.address):
        pass
    clean_env.setenv("GPULEASE_TOKEN", "guessed")
    # Arguments win over the environment.
    with gpulease.lease("tts", broker=broker.address, token_file=token_file):
        pass
    with gpulease.Client(broker.address, token="tts-secret") as client:
        with client.lease("tts"):
            pass
    with pytest.raises(gpulease.LeaseUnauthorized):
        with gpulease.lease("tts", broker=broker.address):
            pass
    assert broker.status().total_grants == 4


def test_status_needs_a_token_only_with_status_requires_token(
    start_broker: Callable[..., Broker], clean_env: pytest.MonkeyPatch
) -> None:
    open_broker = token_broker(start_broker)
    assert gpulease.Client(open_broker.address).status().capacity == 1

    broker = token_broker(start_broker, "status_requires_token = true")
    anonymous = gpulease.Client(broker.address)
    with pytest.raises(gpulease.LeaseUnauthorized) as raised:
        anonymous.status()
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(gpulease.LeaseUnauthorized):
        next(anonymous.watch(timeout=PATIENCE_S))
    anonymous.close()
    # Any known token reads the status, a consumer's too.
    with gpulease.Client(broker.address, token="tts-secret") as client:
        assert client.status().capacity == 1
        assert next(client.watch(timeout=PATIENCE_S)).capacity == 1


def test_revoke_ends_a_held_lease_with_the_admin_token(
    start_broker: Callable[..., Broker], clean_env: pytest.MonkeyPatch
) -> None:
    broker = token_broker(start_broker)
    lost: List[gpulease.LeaseLost] = []
    with pytest.raises(gpulease.LeaseLost) as raised:
        with gpulease.lease(
            "tts", broker=broker.address, token="tts-secret", on_lost=lost.append
        ) as lease:
            with gpulease.Client(broker.address, token="tts-secret") as consumer:
                with pytest.raises(gpulease.LeaseUnauthorized) as refused:
                    consumer.revoke(lease.lease_id)
                assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
            with gpulease.Client(broker.address) as anonymous:
                with pytest.raises(gpulease.LeaseUnauthorized) as refused:
                    anonymous.revoke(lease.lease_id)
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED

            answer = broker.client.revoke(lease.lease_id, "maintenance")
            assert isinstance(answer, gpulease.RevokeLeaseResponse)
            assert answer.revoked and answer.consumer == "tts", answer
            assert lease.lost.wait(PATIENCE_S)
            # Idempotent: a lease no longer held is left alone, and said so.
            again = broker.client.revoke(lease.fencing_token)
            assert not again.revoked and again.message
    assert raised.value.reason == gpulease.RevokeReason.REVOKE_REASON_ADMIN
    assert raised.value.details.endswith("maintenance")
    assert lost == [raised.value]
    assert ended(broker.status())["revoked"] == 1


def test_revoke_by_fencing_token_and_on_asyncio(
    start_broker: Callable[..., Broker], clean_env: pytest.MonkeyPatch
) -> None:
    broker = token_broker(start_broker)

    async def main() -> Dict[str, Any]:
        async with gpulease.aio.Client(broker.address, token="admin-secret") as admin:
            with pytest.raises(gpulease.LeaseLost) as raised:
                async with gpulease.aio.lease(
                    "image", broker=broker.address, token="image-secret"
                ) as lease:
                    answer = await admin.revoke(str(lease.fencing_token), "by token")
                    await asyncio.wait_for(lease.lost.wait(), PATIENCE_S)
            status = await admin.status()
        async with gpulease.aio.Client(broker.address, token="guessed") as stranger:
            with pytest.raises(gpulease.LeaseUnauthorized):
                await stranger.status()
        return {"answer": answer, "lost": raised.value, "status": status}

    result = asyncio.run(main())
    assert result["answer"].revoked and result["answer"].consumer == "image"
    assert result["lost"].reason == gpulease.RevokeReason.REVOKE_REASON_ADMIN
    assert ended(result["status"])["revoked"] == 1


def test_an_asyncio_lease_sends_its_token(
    start_broker: Callable[..., Broker], clean_env: pytest.MonkeyPatch
) -> None:
    broker = token_broker(start_broker)

    async def main() -> None:
        async with gpulease.aio.lease("tts", broker=broker.address, token="tts-secret"):
            pass
        with pytest.raises(gpulease.LeaseUnauthorized) as raised:
            async with gpulease.aio.lease("tts", broker=broker.address, token="image-secret"):
                pass
        assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(main())
    assert broker.status().total_grants == 1


def test_bad_credentials_fail_before_any_call(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="not both"):
        gpulease.Client(token="a", token_file=tmp_path / "t")
    with pytest.raises(ValueError, match="empty"):
        gpulease.Client(token="  \n")
    with pytest.raises(ValueError, match="printable ASCII"):
        gpulease.lease("x", token="s\u00e9cret")
    with pytest.raises(ValueError, match="token file"):
        gpulease.Client(token_file=tmp_path / "missing")
    clean_env.setenv("GPULEASE_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="GPULEASE_TOKEN_FILE"):
        gpulease.Client()
    clean_env.delenv("GPULEASE_TOKEN_FILE")
    with pytest.raises(ValueError, match="CA bundle"):
        gpulease.Client(ca=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="both"):
        gpulease.Client(cert=tmp_path / "client.pem")
    with pytest.raises(ValueError, match="Unix socket"):
        gpulease.Client("unix:/run/gpulease.sock", ca=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="not a broker address"):
        gpulease.Client("ftp://example.invalid:21")
    with pytest.raises(TypeError):
        gpulease.Client().revoke(1.5)  # type: ignore[arg-type]
    # TLS settings in the environment are for TCP brokers; a socket ignores them.
    clean_env.setenv("GPULEASE_CA", str(tmp_path / "missing.pem"))
    assert gpulease.Client("unix:/run/gpulease.sock").target == "unix:/run/gpulease.sock"


def tls_config(certs: Certs, *, mutual: bool = False, extra: str = "") -> str:
    config = f'[auth]\ntls_cert = "{certs.server_cert}"\ntls_key = "{certs.server_key}"\n'
    if mutual:
        config += f'tls_client_ca = "{certs.ca}"\n'
    return config + extra


def test_tls_with_a_ca_bundle(
    start_broker: Callable[..., Broker], certs: Certs, clean_env: pytest.MonkeyPatch
) -> None:
    broker = start_broker(config=tls_config(certs), client={"ca": certs.ca})
    assert broker.status().capacity == 1
    # `ca` implies TLS; so does https://, which is checked against $GPULEASE_CA.
    with gpulease.lease("tts", broker=broker.address, ca=certs.ca) as lease:
        assert broker.status().holders[0].lease_id == lease.lease_id
    clean_env.setenv("GPULEASE_CA", str(certs.ca))
    with gpulease.Client(f"https://{broker.address}") as client:
        with client.lease("tts"):
            assert client.status().in_flight == 1
    clean_env.delenv("GPULEASE_CA")

    async def over_asyncio() -> int:
        async with gpulease.aio.lease("tts", broker=f"https://{broker.address}", ca=certs.ca):
            async with gpulease.aio.Client(broker.address, ca=certs.ca) as client:
                return (await client.status()).in_flight

    assert asyncio.run(over_asyncio()) == 1
    assert broker.status().total_grants == 3

    # Plain text, or a CA that did not sign the broker's certificate, fails.
    with pytest.raises(gpulease.BrokerUnavailable):
        gpulease.Client(broker.address).status(timeout=5)
    with pytest.raises(gpulease.BrokerUnavailable):
        gpulease.Client(broker.address, ca=certs.other_ca).status(timeout=5)
    with pytest.raises(gpulease.BrokerUnavailable):
        with gpulease.lease("tts", broker=broker.address, ca=certs.other_ca, max_wait=5):
            pass


def test_mutual_tls_and_a_token(
    start_broker: Callable[..., Broker], certs: Certs, clean_env: pytest.MonkeyPatch
) -> None:
    extra = '\n[consumers.tts]\ntoken = "tts-secret"\n'
    identity: Dict[str, Any] = {"ca": certs.ca, "cert": certs.client_cert, "key": certs.client_key}
    broker = start_broker(config=tls_config(certs, mutual=True, extra=extra), client=identity)
    assert broker.status().capacity == 1
    with gpulease.lease("tts", broker=broker.address, token="tts-secret", **identity):
        assert broker.status().in_flight == 1
    with pytest.raises(gpulease.LeaseUnauthorized):
        with gpulease.lease("tts", broker=broker.address, **identity):
            pass
    # The same from the environment.
    clean_env.setenv("GPULEASE_CA", str(certs.ca))
    clean_env.setenv("GPULEASE_CERT", str(certs.client_cert))
    clean_env.setenv("GPULEASE_KEY", str(certs.client_key))
    clean_env.setenv("GPULEASE_TOKEN", "tts-secret")
    with gpulease.lease("tts", broker=broker.address):
        pass
    clean_env.delenv("GPULEASE_CERT")
    clean_env.delenv("GPULEASE_KEY")
    # Without a client certificate the broker refuses the connection.
    with pytest.raises(gpulease.BrokerUnavailable):
        gpulease.Client(broker.address).status(timeout=5)
    assert broker.status().total_grants == 2


def test_a_residency_helper_over_tls_with_a_token(
    start_broker: Callable[..., Broker], certs: Certs, clean_env: pytest.MonkeyPatch
) -> None:
    extra = '\n[consumers.llm]\nunload = "stream"\ntoken = "llm-secret"\n'
    broker = start_broker(config=tls_config(certs, extra=extra), client={"ca": certs.ca})
    calls: List[Any] = []
    with gpulease.residency(
        "llm", calls.append, broker=broker.address, ca=certs.ca, token="guessed"
    ) as refused:
        with pytest.raises(gpulease.LeaseUnauthorized):
            refused.wait_connected(PATIENCE_S)
        assert not refused.connected
    with gpulease.residency(
        "llm", calls.append, broker=f"https://{broker.address}", ca=certs.ca, token="llm-secret"
    ) as helper:
        assert helper.wait_connected(PATIENCE_S)
    assert not any(t.name.startswith("gpulease-residency") for t in threading.enumerate())
