"""The README's Python examples, run as they are written against a real
broker (found through $GPULEASE_BROKER, as a user's would be), with a fake
ollama server and stand-ins for ComfyUI's modules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

import gpulease
from conftest import PATIENCE_S, Broker, ended

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
        "decorator",
        "lost",
        "queued",
        "asyncio",
        "status",
        "ollama",
        "comfyui",
    }


@pytest.mark.parametrize("name", ["quickstart", "decorator", "lost", "queued", "asyncio"])
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


@pytest.fixture
def fake_ollama(broker: Broker) -> Iterator[FakeOllama]:
    """An HTTP server answering /api/generate like ollama; each request is
    recorded with the broker's holders at the time."""
    requests: List[Dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            holders = [h.consumer for h in gpulease.Client(broker.address).status().holders]
            requests.append({"path": self.path, "body": body, "holders": holders})
            answer = json.dumps(
                {"model": body["model"], "response": "Rayleigh scattering.", "done": True}
            )
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
    yield FakeOllama(f"127.0.0.1:{server.server_address[1]}", requests)
    server.shutdown()
    server.server_close()


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
