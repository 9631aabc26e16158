"""Runs the real `gpulease serve` binary for the tests, on an ephemeral port.

The broker prints one ``listening on ADDR`` line per listener once it accepts
calls; the fixture reads those lines, so no test ever sleeps to wait for it.
Each test gets its own broker, with its own state directory, so that counts
in Status start from zero. `certs` makes a CA and certificates for the TLS
tests with the `openssl` command.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generator, Iterator, List, Mapping, Optional

import pluggy
import pytest

import gpulease
from gpulease.v1 import lease_pb2

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
HOLDER = HERE / "holder.py"

#: How long anything that should happen at once may take on a busy machine.
PATIENCE_S = 20.0


def broker_binary() -> Path:
    configured = os.environ.get("GPULEASE_BIN")
    path = Path(configured) if configured else REPO / "target" / "debug" / "gpulease"
    if not path.is_file():
        pytest.fail(f"no broker binary at {path}: run `cargo build --bins` or set GPULEASE_BIN")
    return path


class Broker:
    """One `gpulease serve` process.

    `config` is the text of a TOML configuration file; `settings` become
    ``GPULEASE__KEY`` variables (``gpu__source="static"``). `client` are the
    credentials of the broker's own `client` (``token=``, ``ca=``, ...).
    """

    def __init__(
        self,
        log: Path,
        *,
        socket: Optional[Path] = None,
        config: Optional[str] = None,
        client: Optional[Mapping[str, Any]] = None,
        **settings: str,
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEASE")}
        env["GPULEASE__LISTEN"] = "127.0.0.1:0"
        env["GPULEASE__STATE_DIR"] = str(log.with_suffix(".state"))
        # After SIGTERM the broker waits for every connection to close, and a
        # grpc-python connection sometimes answers the broker's shutdown ping
        # only after about 5 s; a shorter grace keeps such tests quick. A test
        # that must see the broker's last messages (which a connection reset
        # at the end of the grace can destroy) asks for a longer one.
        env["GPULEASE__SHUTDOWN_GRACE"] = "1s"
        if socket is not None:
            env["GPULEASE__SOCKET"] = str(socket)
        for key, value in settings.items():
            env[f"GPULEASE__{key.upper()}"] = value
        command = [str(broker_binary()), "serve"]
        if config is not None:
            config_file = log.with_suffix(".toml")
            config_file.write_text(config)
            command += ["--config", str(config_file)]
        self.log = log
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            text=True,
        )
        lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._read_stdout, args=(lines,), daemon=True).start()
        self.addresses: List[str] = []
        for _ in range(2 if socket is not None else 1):
            try:
                line = lines.get(timeout=PATIENCE_S)
            except queue.Empty:
                line = None
            if line is None or not line.startswith("listening on "):
                self.kill()
                raise RuntimeError(f"the broker did not start ({line!r}):\n{self.log_text()}")
            self.addresses.append(line[len("listening on ") :].strip())
        #: The TCP address, HOST:PORT.
        self.address = next(a for a in self.addresses if not a.startswith("unix:"))
        #: The client's credentials, for tests that make more clients.
        self.credentials: Dict[str, Any] = dict(client or {})
        self.client = gpulease.Client(self.address, **self.credentials)

    def _read_stdout(self, lines: queue.Queue[Optional[str]]) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            lines.put(line)
        lines.put(None)

    def log_text(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def status(self) -> lease_pb2.StatusResponse:
        return self.client.status()

    def wait_until(
        self,
        predicate: Callable[[lease_pb2.StatusResponse], bool],
        what: str,
        timeout: float = PATIENCE_S,
    ) -> lease_pb2.StatusResponse:
        """Watches Status until `predicate` holds; fails after `timeout`.

        A snapshot follows every change, so a state that lasts is always
        seen; a passing one may be coalesced away, so wait only for states
        that last.
        """
        last = None
        for snapshot in self.client.watch(timeout=timeout):
            last = snapshot
            if predicate(snapshot):
                return snapshot
        raise AssertionError(f"timed out waiting until {what}; last status:\n{last}")

    def stop(self) -> None:
        """SIGTERM: the broker revokes every lease and ends every stream, then
        exits once the connections close or its shutdown grace has passed."""
        self.process.send_signal(signal.SIGTERM)

    def wait_graceful_exit(self) -> None:
        """Waits for the broker to exit, and fails unless it shut down
        gracefully (exit status 0)."""
        code = self.process.wait(timeout=PATIENCE_S)
        assert code == 0, f"the broker exited with {code} instead of shutting down gracefully" + (
            " (killed by SIGTERM: was its handler not installed yet?)" if code == -15 else ""
        )

    def terminate(self) -> int:
        """`stop`, and wait for the broker to exit."""
        self.stop()
        return self.process.wait(timeout=PATIENCE_S)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=PATIENCE_S)

    def close(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.terminate()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log_file.close()


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Starts brokers with settings (``capacity="2"``, ``socket=path``,
    ``config="...toml..."``, ``client={"token": ...}``) and stops them after
    the test, showing their log if it failed."""
    brokers: List[Broker] = []

    def start(**settings: Any) -> Broker:
        socket = settings.pop("socket", None)
        config = settings.pop("config", None)
        client = settings.pop("client", None)
        broker = Broker(
            tmp_path / f"broker-{len(brokers)}.log",
            socket=Path(str(socket)) if socket is not None else None,
            config=config,
            client=client,
            **{k: str(v) for k, v in settings.items()},
        )
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.close()


@pytest.fixture
def broker(start_broker: Callable[..., Broker]) -> Broker:
    """A broker with capacity 1 on 127.0.0.1:<ephemeral>."""
    return start_broker()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        funcargs: Dict[str, Any] = getattr(item, "funcargs", {})
        for log in sorted(Path(str(funcargs.get("tmp_path", "/nonexistent"))).glob("broker-*.log")):
            report.sections.append(
                (f"broker log {log.name}", log.read_text(errors="replace")[-4000:])
            )


def interruptible() -> None:
    """Runs in a child before it starts: SIGINT interrupts it as Ctrl-C does
    at a terminal, even where the tests themselves run with SIGINT ignored
    (a shell's background job, `nohup`), which a child would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Holder:
    """A Python process that runs tests/holder.py."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ)
        env.pop("GPULEASE_BROKER", None)
        self.process = subprocess.Popen(
            [sys.executable, str(HOLDER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            preexec_fn=interruptible,
        )

    def expect(self, prefix: str) -> str:
        """The next line of its stdout, which must start with `prefix`."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith(prefix):
            self.process.kill()
            _, err = self.process.communicate(timeout=PATIENCE_S)
            raise AssertionError(
                f"expected {prefix!r} from the holder, got {line!r}; stderr:\n{err}"
            )
        return line.strip()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=PATIENCE_S)


@pytest.fixture
def holders() -> Iterator[Callable[..., Holder]]:
    started: List[Holder] = []

    def start(*args: str) -> Holder:
        holder = Holder(*args)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.close()


def ended(status: lease_pb2.StatusResponse) -> Dict[str, int]:
    """The `ended` counters of a snapshot as a dict, for assertions."""
    e = status.ended
    return {
        "released": e.released,
        "half_closed": e.half_closed,
        "disconnected": e.disconnected,
        "revoked": e.revoked,
        "withdrawn": e.withdrawn,
        "unclaimed": e.unclaimed,
        "expired": e.expired,
    }


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate for 127.0.0.1 and a client
    certificate, both signed by the CA, and a CA that signed neither."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=PATIENCE_S
    )
    assert done.returncode == 0, f"openssl {' '.join(args)} failed:\n{done.stderr}"


def _make_ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN=gpulease test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip


def _make_leaf(name: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN=gpulease test {name}",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Test certificates, made once per run with the `openssl` command."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests need the openssl command")
    cwd = tmp_path_factory.mktemp("certs")
    _make_ca("ca", cwd)
    _make_ca("other-ca", cwd)
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    _make_leaf(
        "server",
        leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        cwd,
    )
    _make_leaf("client", leaf + "extendedKeyUsage=clientAuth\n", cwd)
    return Certs(
        ca=cwd / "ca.pem",
        server_cert=cwd / "server.pem",
        server_key=cwd / "server.key",
        client_cert=cwd / "client.pem",
        client_key=cwd / "client.key",
        other_ca=cwd / "other-ca.pem",
    )
