"""The README's Python examples, run as they are written against a real
broker (found through $GPULEASE_BROKER, as a user's would be), with a fake
ollama server and stand-ins for ComfyUI's modules."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

import gpulease
from conftest import PATIENCE_S, Broker, Certs, ended, interruptible

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- test: (?P<name>[\w-]+) -->\n```python\n(?P<code>.*?)```", re.DOTALL)


def examples() -> Dict[str, str]:
    return {m["name"]: m["code"] for m in BLOCK.finditer(README.read_text())}


def run_example(code: str, broker: Broker, tmp_path: Path, **env: str) -> str:
    """Runs `code` in a fresh interpreter; returns its stdout."""
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        cwd=tmp_path,
        env={**os.environ, "GPULEASE_BROKER": broker.address, **env},
    )
    assert done.returncode == 0, f"the example failed:\n{done.stderr}"
    return done.stdout


def test_every_python_example_is_tested() -> None:
    assert README.read_text().count("```python") == len(examples())
    assert set(examples()) == {
        "quickstart",
        "gpu",
        "decorator",
        "lost",
        "queued",
        "preempt",
        "asyncio",
        "status",
        "tls",
        "revoke",
        "residency",
        "ollama",
        "comfyui",
    }


def test_the_gpu_example_holds_the_gpu_it_names(
    start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = start_broker(gpu__source="static", gpu__static_memory_mib="8192,8192")
    out = run_example(examples()["gpu"], broker, tmp_path)
    assert out == "GPU 1 is ours\n"
    status = broker.status()
    assert status.total_grants == 1
    assert ended(status)["released"] == 1


@pytest.mark.parametrize(
    "name", ["quickstart", "decorator", "lost", "queued", "preempt", "asyncio"]
)
def test_a_lease_example_takes_and_releases_one_lease(
    name: str, broker: Broker, tmp_path: Path
) -> None:
    out = run_example(examples()[name], broker, tmp_path)
    status = broker.status()
    assert status.total_grants == 1, out
    assert ended(status)["released"] == 1
    assert status.in_flight == 0


def test_the_status_example(broker: Broker, tmp_path: Path) -> None:
    out = run_example(examples()["status"], broker, tmp_path)
    assert out.startswith("0/1 held, 0 waiting\nin flight: 0\n"), out


class FakeOllama:
    def __init__(self, address: str, requests: List[Dict[str, Any]]) -> None:
        self.address = address
        self.requests = requests


@contextlib.contextmanager
def serve_fake_ollama(broker: Broker) -> Iterator[FakeOllama]:
    """An HTTP server answering /api/generate and /api/ps like ollama, with
    one model loaded; each POST is recorded with the broker's holders at the
    time."""
    requests: List[Dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            holders = [h.consumer for h in gpulease.Client(broker.address).status().holders]
            requests.append({"path": self.path, "body": body, "holders": holders})
            self.answer({"model": body["model"], "response": "Rayleigh scattering.", "done": True})

        def do_GET(self) -> None:  # noqa: N802
            assert self.path == "/api/ps", self.path
            self.answer({"models": [{"name": "llama3.2:latest", "size_vram": 10737418240}]})

        def answer(self, message: Dict[str, Any]) -> None:
            answer = json.dumps(message)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FakeOllama(f"127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake_ollama(broker: Broker) -> Iterator[FakeOllama]:
    with serve_fake_ollama(broker) as ollama:
        yield ollama


def test_the_ollama_example_holds_the_lease_during_the_request(
    broker: Broker, tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    out = run_example(examples()["ollama"], broker, tmp_path, OLLAMA_HOST=fake_ollama.address)
    assert out == "Rayleigh scattering.\n"
    (request,) = fake_ollama.requests
    assert request["path"] == "/api/generate"
    assert request["body"]["keep_alive"] == 0
    assert request["holders"] == ["ollama"]
    assert broker.status().in_flight == 0


COMFY_STANDINS = {
    # What the example uses of ComfyUI, recording calls in CALLS.
    "nodes.py": """
import gpulease
CALLS = []

class KSampler:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {})}}

    def sample(self, seed):
        holders = [h.consumer for h in gpulease.Client().status().holders]
        CALLS.append(("sample", seed, holders))
        return ({"samples": seed},)
""",
    "comfy/__init__.py": "",
    "comfy/model_management.py": """
from nodes import CALLS

def interrupt_current_processing(value=True):
    CALLS.append(("interrupt",))

def unload_all_models():
    CALLS.append(("unload_all_models",))

def soft_empty_cache(force=False):
    CALLS.append(("soft_empty_cache",))
""",
}

COMFY_DRIVER = """
import sys
sys.path[:0] = ["comfyui", "comfyui/custom_nodes"]
import nodes
from gpulease_ksampler import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

node_class = NODE_CLASS_MAPPINGS["LeasedKSampler"]
print(NODE_DISPLAY_NAME_MAPPINGS["LeasedKSampler"])
print(node_class.INPUT_TYPES(), node_class.RETURN_TYPES)
# ComfyUI calls getattr(node, FUNCTION)(**inputs).
print(getattr(node_class(), node_class.FUNCTION)(seed=7))
print(nodes.CALLS)
"""


def test_the_comfyui_node_samples_under_the_lease(broker: Broker, tmp_path: Path) -> None:
    root = tmp_path / "comfyui"
    for name, text in COMFY_STANDINS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    node = root / "custom_nodes" / "gpulease_ksampler" / "__init__.py"
    node.parent.mkdir(parents=True)
    node.write_text(examples()["comfyui"])

    out = run_example(COMFY_DRIVER, broker, tmp_path).splitlines()
    assert out[0] == "KSampler (GPU lease)"
    assert out[1] == "{'required': {'seed': ('INT', {})}} ('LATENT',)"
    assert out[2] == "({'samples': 7},)"
    assert out[3] == "[('sample', 7, ['comfyui']), ('unload_all_models',), ('soft_empty_cache',)]"
    assert ended(broker.status())["released"] == 1


def test_the_tls_example(start_broker: Callable[..., Broker], certs: Certs, tmp_path: Path) -> None:
    config = (
        f'[auth]\ntls_cert = "{certs.server_cert}"\ntls_key = "{certs.server_key}"\n'
        '[consumers.comfyui]\ntoken = "comfy-secret"\n'
    )
    broker = start_broker(config=config, client={"ca": certs.ca})
    (tmp_path / "comfyui.token").write_text("comfy-secret\n")
    shutil.copy(certs.ca, tmp_path / "ca.pem")
    out = run_example(
        examples()["tls"], broker, tmp_path, GPULEASE_BROKER=f"https://{broker.address}"
    )
    assert re.fullmatch(r"lease \S+ over TLS\n", out), out
    assert ended(broker.status())["released"] == 1


def test_the_revoke_example(start_broker: Callable[..., Broker], tmp_path: Path) -> None:
    config = '[auth]\nadmin_token = "admin-secret"\n[consumers.trainer]\ntoken = "t-secret"\n'
    broker = start_broker(config=config)
    (tmp_path / "admin.token").write_text("admin-secret\n")
    with pytest.raises(gpulease.LeaseLost) as raised:
        with gpulease.lease("trainer", broker=broker.address, token="t-secret") as lease:
            out = run_example(examples()["revoke"], broker, tmp_path)
            assert lease.lost.wait(PATIENCE_S)
    assert out == "revoked the lease of trainer\n"
    assert raised.value.reason == gpulease.RevokeReason.REVOKE_REASON_ADMIN
    assert raised.value.details.endswith("GPU maintenance at 18:00")


class LineReader:
    """The lines a process prints, with a timeout on each."""

    def __init__(self, process: "subprocess.Popen[str]") -> None:
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: "subprocess.Popen[str]") -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self) -> Optional[str]:
        return self._lines.get(timeout=PATIENCE_S)


def test_the_residency_example_unloads_ollama_when_image_needs_the_memory(
    start_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    config = """
[consumers.ollama]
kind = "llm"
vram_mib = 10240
unload = "stream"

[consumers.image]
vram_mib = 12288
"""
    broker = start_broker(config=config, gpu__source="static", gpu__static_memory_mib="16384")
    script = tmp_path / "residency.py"
    script.write_text(examples()["residency"])
    with serve_fake_ollama(broker) as ollama:
        process = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "GPULEASE_BROKER": broker.address, "OLLAMA_HOST": ollama.address},
            preexec_fn=interruptible,
        )
        try:
            lines = LineReader(process)
            assert lines.next() == "waiting for unload requests; Ctrl-C stops\n"
            with gpulease.lease("ollama", vram_mib=10240, broker=broker.address):
                pass
            assert [r.consumer for r in broker.status().gpus[0].residents] == ["ollama"]
            with gpulease.lease("image", vram_mib=12288, broker=broker.address, max_wait=10):
                (request,) = ollama.requests
                assert request["path"] == "/api/generate"
                assert request["body"] == {"model": "llama3.2:latest", "keep_alive": 0}
                assert lines.next() == "unloaded ['llama3.2:latest'] for image\n"
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=PATIENCE_S)
            assert process.returncode == 0, err
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert broker.status().evictions.completed == 1
