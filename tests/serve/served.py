"""A tiny served model for the tests of loratune/serve: the files (a Llama with a real BPE tokenizer and a chat
template, four PEFT adapters under one --adapter-dir), ``loratune serve``'s app under uvicorn in a thread, and the
reference answers (``generate`` with one adapter alone)."""

from __future__ import annotations

import json
import threading
import time

import uvicorn
from conftest import free_port
from family_models import MIXED_ADAPTERS, generate_alone, load_with_peft_adapters, save_family, write_small_tokenizer

from loratune.cli import build_parser
from loratune.cli.serve import build
from loratune.data.tokenizer import load_tokenizer
from loratune.generate import SamplingConfig

ADAPTERS = MIXED_ADAPTERS
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["the red cat", "where does the dog", "blue bird runs to", "the fox sleeps in the", "green garden and"]


def make_files(root):
    """A tiny Llama with a real BPE tokenizer and a chat template, its adapters under one --adapter-dir, and a
    reference model holding them all (for ``generate``)."""
    base = root / "base"
    save_family("llama", base, vocab_size=320)  # weights of std 0.25: greedy text that varies
    write_small_tokenizer(base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    adapters = root / "adapters"
    adapters.mkdir()
    reference = load_with_peft_adapters(base, adapters, ADAPTERS, std=0.3).eval()
    return {"base": base, "adapters": adapters, "reference": reference, "tokenizer": load_tokenizer(base)}


class Running:
    """``loratune serve``'s app under uvicorn in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, files, **options) -> None:
        self.port = free_port()
        args = build_parser().parse_args([
            "serve", "--model", str(files["base"]), "--device", "cpu", "--dtype", "float32", "--served-model-name",
            "base", "--adapter-dir", str(files["adapters"]), "--max-batch", "8", "--max-tokens", "64", "--timeout",
            "60", *[a for n in ADAPTERS for a in ("--adapter", f"{n}={files['adapters'] / n}")]])  # the CLI's defaults
        for key, value in options.items():  # by attribute name, over the parsed flags
            setattr(args, key, value)
        self.app, self.server = build(args)
        self.server.worker.start()
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.server.worker.stop()


def expected(files, prompt: str, adapter: str | None, max_tokens: int) -> str:
    """What greedy ``generate`` gives the prompt with this adapter alone (the text, up to end-of-text)."""
    tok = files["tokenizer"]
    cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)
    return tok.decode(generate_alone(files["reference"], tok.encode(prompt), adapter, cfg, tok.eos_ids))
