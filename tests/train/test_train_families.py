"""The one training loop on the Llama-style families: LoRA by the tutorial's names, precision
dtypes, and the adapter it writes loads back with the same effect."""

from __future__ import annotations

import json

import pytest
import torch

from family_models import save_family, write_small_tokenizer
from loratune.adapters.peft_format import load_adapter
from loratune.data.tokenizer import load_tokenizer
from loratune.models import load_model
from loratune.recipe import Recipe
from loratune.train.loss import lm_loss_sum
from loratune.train.metrics import read_metrics
from loratune.train import setup_model, train
from test_train import write_sentences


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_sentences(tmp_path_factory.mktemp("data") / "sentences.jsonl")


def _checkpoint(tmp_path, name: str, dtype: torch.dtype = torch.float32):
    d = tmp_path / name
    model = save_family(name, d / "tmp")
    model.to(dtype).save_pretrained(d)
    write_small_tokenizer(d)
    return d


def _recipe(model_dir, data_file, out, **kw) -> Recipe:
    base = dict(model=str(model_dir), out_dir=str(out), finetune="lora", seq_len=16, batch_size=8, max_steps=8,
                lr=3e-3, log_every=4, eval_every=8, eval_batches=1, save_every=8, seed=0, precision="fp32",
                device="cpu", sample_tokens=0)
    base.update(kw)
    recipe = Recipe(**base)
    recipe.data.source, recipe.data.text_field, recipe.data.val_fraction = str(data_file), "text", 0.1
    recipe.lora.targets = ["q", "v"]
    return recipe


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
def test_tutorial_lora_trains_on_the_family(tmp_path, data_file, name):
    """targets [q, v] find q_proj/v_proj (Phi-3: the q and v slices of qkv_proj); the loss falls,
    and the saved adapter, loaded onto a fresh base, fits the training text better than the base."""
    d = _checkpoint(tmp_path, name)
    train(_recipe(d, data_file, tmp_path / "run"))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    tokenizer = load_tokenizer(d)
    texts = [json.loads(line)["text"] for line in data_file.read_text().splitlines()[:8]]
    ids = torch.tensor([tokenizer.encode(t)[:12] for t in texts])
    base, _ = load_model(d)
    with torch.no_grad():
        before = float(lm_loss_sum(base, ids[:, :-1], ids[:, 1:]))
        load_adapter(base, tmp_path / "run" / "adapter")
        after = float(lm_loss_sum(base, ids[:, :-1], ids[:, 1:]))
    assert after < before


@pytest.mark.parametrize("precision, weight_dtype", [("fp32", torch.float32), ("bf16-true", torch.bfloat16),
                                                     ("bf16-mixed", torch.float32)])
def test_a_bf16_checkpoint_loads_in_the_precision_the_recipe_trains_in(tmp_path, data_file, precision,
                                                                       weight_dtype):
    d = _checkpoint(tmp_path, "qwen3", dtype=torch.bfloat16)
    model, _, _ = setup_model(_recipe(d, data_file, tmp_path / "x", precision=precision), torch.device("cpu"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {weight_dtype} and trainable == {torch.float32}
