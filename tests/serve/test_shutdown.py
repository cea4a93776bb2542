"""``loratune serve`` as a process: SIGTERM lets the answer in flight finish, refuses new connections at once,
and ends the process with status 0; a port in use is a clear error (status 2)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import free_port  # noqa: E402
from family_models import save_family, write_small_tokenizer  # noqa: E402

MAX_TOKENS = 400


@pytest.fixture
def serving(tmp_path):
    """A Llama big enough that 400 streamed tokens take a few seconds here, served by a real process."""
    base = tmp_path / "base"
    save_family("llama", base, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    write_small_tokenizer(base)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "serve", "--model", str(base), "--device", "cpu",
                             "--port", str(port), "--served-model-name", "base", "--max-tokens", str(MAX_TOKENS),
                             "--max-prompt-tokens", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sigterm_finishes_the_answer_in_flight_and_refuses_new_ones(serving):
    proc, url = serving
    body = {"model": "base", "prompt": "the red cat", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    refused_while_streaming, usage, started = False, None, time.monotonic()
    with httpx.Client(base_url=url, timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)  # the first chunk: the request runs
        proc.send_signal(signal.SIGTERM)
        for line in lines:
            if line.startswith("data: {") and '"usage"' in line and '"choices": []' in line:
                usage = httpx.Response(200, content=line[6:]).json()["usage"]
            if not refused_while_streaming and time.monotonic() - started > 0.5:
                try:
                    httpx.get(url + "/health", timeout=2)
                except httpx.ConnectError:
                    refused_while_streaming = True
    assert usage is not None and usage["completion_tokens"] > 100, "the answer in flight did not finish"
    assert refused_while_streaming, "a new connection was taken while the answer in flight was streaming"
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.slow
def test_a_port_in_use_is_a_clear_error(tmp_path):
    import socket

    base = tmp_path / "base"
    save_family("llama", base)
    write_small_tokenizer(base)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "loratune", "serve", "--model", str(base), "--device", "cpu",
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"could not serve on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
