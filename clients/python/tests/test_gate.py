"""The real `ollama` Python client through `gpulease gate`.

A fake ollama-like server (a thread in the test) streams NDJSON slowly; the
client streams a generation through the gate and gets the same chunks, the
gate holds one lease for consumer "ollama" meanwhile, and releases it
afterwards (no linger).
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List, Optional

import ollama
import pytest

from conftest import PATIENCE_S, Broker, broker_binary

LINES = [
    {"model": "m", "created_at": "2026-12-01T00:00:00Z", "response": f"tok{i} ", "done": i == 4}
    for i in range(5)
]


class FakeOllama(BaseHTTPRequestHandler):
    """`POST /api/generate`: five NDJSON lines, 30 ms apart, chunked."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", "0"))
        json.loads(self.rfile.read(length) or b"{}")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in LINES:
            data = (json.dumps(line) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
            time.sleep(0.03)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture
def gate(broker: Broker, upstream: str) -> Iterator[str]:
    command = [str(broker_binary()), "gate", "--broker", broker.address, "--consumer", "ollama"]
    command += ["--listen", "127.0.0.1:0", "--upstream", upstream, "--linger", "0s"]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    lines: queue.Queue[Optional[str]] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    line = lines.get(timeout=PATIENCE_S)
    assert line is not None and line.startswith("listening on "), line
    try:
        yield "http://" + line[len("listening on ") :].strip()
    finally:
        process.terminate()
        process.wait(timeout=PATIENCE_S)


def test_the_ollama_client_streams_through_the_gate(broker: Broker, gate: str) -> None:
    client = ollama.Client(host=gate)
    seen: List[Optional[str]] = []
    held_meanwhile = False
    for chunk in client.generate(model="m", prompt="hi", stream=True):
        seen.append(chunk.response)
        if not held_meanwhile:
            holders = broker.status().holders
            held_meanwhile = [h.consumer for h in holders] == ["ollama"]
    assert seen == [line["response"] for line in LINES]
    assert held_meanwhile, "the gate held no lease while the response streamed"
    status = broker.wait_until(lambda s: s.in_flight == 0, "the gate's lease released")
    assert status.total_grants == 1
    assert status.ended.released == 1
