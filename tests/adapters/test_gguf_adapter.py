"""Reading a llama.cpp LoRA adapter GGUF (loratune/adapters/gguf_adapter.py): ``--adapter x.gguf``.

The adapter GGUFs are written by ``write_lora_gguf`` (whose file format and llama.cpp runs are checked in
tests/export/test_gguf_lora.py). Read back here, through ``load_adapter`` and the commands that take
``--adapter`` (generate, eval, merge), they act as the PEFT adapter they came from (1e-5 relative on
logits, float32), on a Hugging Face base and on a GGUF base. A LoRA GGUF for another base (another
architecture, another shape or depth) or a model GGUF given as the adapter is one line naming the
mismatch, and the model is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_, rel_err
from family_models import token_ids, write_decoder, write_small_tokenizer

from loratune.adapters.lora import LoRAConfig, lora_layers
from loratune.adapters.peft_format import load_adapter, save_adapter
from loratune.adapters.targets import inject_lora
from loratune.cli import main
from loratune.errors import CheckpointError
from loratune.export.gguf_lora import write_lora_gguf
from loratune.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore")
RTOL = 1e-5


def _base(root: Path, case: str = "llama", **overrides) -> Path:
    """A tiny checkpoint of ``case`` with a real (small, trained) tokenizer: a complete model directory."""
    path = write_decoder(case, root / case / "base", **overrides)
    write_small_tokenizer(path)
    return path


def _adapter_gguf(base: Path, root: Path, seed: int = 1, **lora) -> tuple[Path, Path, torch.nn.Module]:
    """(PEFT adapter dir, its LoRA GGUF, our model holding it) for a seeded random LoRA on ``base``."""
    model, _ = load_model(base)
    cfg = LoRAConfig(**{"r": 4, "alpha": 32.0, "targets": ["q", "k", "v"], **lora})
    inject_lora(model, cfg)
    randomize_lora_(model, seed=seed, std=0.5)
    save_adapter(model, root / "adapter", cfg, base_model=str(base))
    return root / "adapter", write_lora_gguf(base, root / "adapter", root / "adapter.gguf"), model.eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).float()


def test_load_adapter_reads_a_lora_gguf_as_the_adapter_it_came_from(tmp_path):
    base = _base(tmp_path)
    _, gguf, ours = _adapter_gguf(base, tmp_path, targets=["q", "k", "v", "o", "gate"])
    model, _ = load_model(base)
    lora = load_adapter(model, gguf)
    assert (lora.r, lora.alpha, lora.rslora) == (4, 32.0, False)
    assert {n for n, _ in lora_layers(model)} == {n for n, _ in lora_layers(ours)}
    ids = token_ids()
    assert rel_err(_logits(model.eval(), ids), _logits(ours, ids)) <= RTOL


def test_a_gguf_base_takes_a_gguf_adapter(tmp_path):
    """The whole llama.cpp pair: base and adapter both GGUF, as llama.cpp runs them."""
    from loratune.export.gguf_model import write_model_gguf

    base = _base(tmp_path)
    model, model_dir = load_model(base)
    base_gguf = write_model_gguf(model, model_dir, tmp_path / "base.gguf", "f32")
    _, gguf, ours = _adapter_gguf(base_gguf, tmp_path)
    model, _ = load_model(base_gguf)
    load_adapter(model, gguf)
    ids = token_ids()
    assert rel_err(_logits(model.eval(), ids), _logits(ours, ids)) <= RTOL


def test_generate_and_eval_take_a_gguf_adapter_as_the_peft_one(tmp_path, capsys):
    base = _base(tmp_path)
    peft_dir, gguf, _ = _adapter_gguf(base, tmp_path)
    outputs = []
    for adapter in (peft_dir, gguf, None):
        extra = ["--adapter", str(adapter)] if adapter else []
        assert main(["generate", "--model", str(base), *extra, "--prompt", "the cat runs to the",
                     "--max-new-tokens", "12"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the red fox sleeps in the garden",
                                                                      "where does the blue bird run"]))
    losses = []
    for adapter in (peft_dir, gguf):
        assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(data),
                     "--text-field", "text", "--seq-len", "32", "--json"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_merge_takes_a_gguf_adapter(tmp_path, capsys):
    """The GGUF adapter merges as the PEFT adapter it came from does."""
    base = _base(tmp_path)
    peft_dir, gguf, _ = _adapter_gguf(base, tmp_path)
    for adapter, out in ((gguf, "merged"), (peft_dir, "merged-peft")):
        assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / out)]) == 0
    merged, _ = load_model(tmp_path / "merged")
    reference, _ = load_model(tmp_path / "merged-peft")
    ids = token_ids()
    assert rel_err(_logits(merged, ids), _logits(reference, ids)) <= RTOL
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert str(gguf.resolve()) in json.dumps(config)  # the merge record names the GGUF it came from


def test_serve_loads_a_gguf_adapter(tmp_path):
    """loratune serve's --adapter NAME=FILE path (a trusted load, as the command line gives it)."""
    from loratune.adapters.named import set_active_adapters
    from loratune.serve.adapters import AdapterRegistry

    base = _base(tmp_path)
    _, gguf, ours = _adapter_gguf(base, tmp_path)
    model, _ = load_model(base)
    registry = AdapterRegistry(model, "base", None, 4)
    registry.load("tldr", gguf, set(), trusted=True)
    assert registry.names() == ["tldr"]
    set_active_adapters(model, "tldr")
    ids = token_ids()
    assert rel_err(_logits(model.eval(), ids), _logits(ours, ids)) <= RTOL



def test_no_alpha_means_scale_one_as_in_llama_cpp(tmp_path):
    """llama.cpp scales a pair by alpha / r, or by 1 where the file has no alpha: the same adapter with B
    multiplied by alpha / r and no alpha key computes the same."""
    from loratune.hub.gguf_file import read_gguf
    from loratune.hub.gguf_write import write_gguf

    base = _base(tmp_path)
    _, gguf, ours = _adapter_gguf(base, tmp_path)
    file = read_gguf(gguf)
    tensors = {n: (t.dequantize(torch.float32) * (32.0 / 4 if n.endswith("lora_b") else 1.0), "F32")
               for n, t in file.tensors.items()}
    metadata = {k: v for k, v in file.metadata.items() if k != "adapter.lora.alpha"}
    path = write_gguf(tmp_path / "no-alpha.gguf", file.architecture, metadata, tensors)
    model, _ = load_model(base)
    load_adapter(model, path)
    ids = token_ids()
    assert rel_err(_logits(model.eval(), ids), _logits(ours, ids)) <= RTOL


# --- another base: refused, the model untouched ------------------------------------------------

def _refused(model, adapter: Path, match: str) -> None:
    ids = token_ids()
    before = _logits(model, ids)
    with pytest.raises(CheckpointError, match=match) as info:
        load_adapter(model, adapter)
    assert "\n" not in str(info.value)
    assert not list(lora_layers(model)), "a refused adapter must not leave the model half adapted"
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def test_a_lora_gguf_for_another_architecture_is_refused(tmp_path):
    _, gguf, _ = _adapter_gguf(_base(tmp_path, "qwen2"), tmp_path)
    model, _ = load_model(_base(tmp_path, "llama"))
    _refused(model, gguf, "is a LoRA GGUF for another base: its general.architecture is 'qwen2', this Llama "
                          "model's is 'llama'")


def test_a_lora_gguf_for_another_shape_is_refused(tmp_path):
    _, gguf, _ = _adapter_gguf(_base(tmp_path, "llama", intermediate_size=128), tmp_path, targets=["q", "down"])
    model, _ = load_model(_base(tmp_path, "llama"))
    _refused(model, gguf, r"for another base: blk.0.ffn_down.weight.lora_a is \(4, 128\) and .lora_b \(64, 4\), but "
                          r"this model's model.layers.0.mlp.down_proj is 96 -> 64")


def test_a_lora_gguf_for_a_deeper_model_is_refused(tmp_path):
    _, gguf, _ = _adapter_gguf(_base(tmp_path, "llama", num_hidden_layers=4), tmp_path)
    model, _ = load_model(_base(tmp_path, "llama"))
    _refused(model, gguf, r"for another base: blk.3.attn_\w.weight is no layer of this Llama model \(3 layers\)")


def test_a_model_gguf_as_the_adapter_is_refused(tmp_path):
    from loratune.export.gguf_model import write_model_gguf

    base = _base(tmp_path)
    model, model_dir = load_model(base)
    path = write_model_gguf(model, model_dir, tmp_path / "model.gguf", "f32")
    _refused(model, path, r"is not a LoRA adapter GGUF \(general.type 'model'")


def test_a_lora_on_the_token_embeddings_is_refused(tmp_path):
    """mergekit's adapters carry a token-embedding pair (llama.cpp applies it at the lookup): no LoRA layer here."""
    from loratune.hub.gguf_file import read_gguf
    from loratune.hub.gguf_write import write_gguf

    base = _base(tmp_path)
    _, gguf, _ = _adapter_gguf(base, tmp_path)
    file = read_gguf(gguf)
    tensors = {n: (t.dequantize(torch.float32), "F32") for n, t in file.tensors.items()}
    tensors["token_embd.weight.lora_a"] = (torch.ones(320, 4), "F32")  # flipped: (vocab, r) and (r, hidden)
    tensors["token_embd.weight.lora_b"] = (torch.ones(4, 64), "F32")
    path = write_gguf(tmp_path / "embd.gguf", file.architecture, file.metadata, tensors)
    model, _ = load_model(base)
    _refused(model, path, r"adapts the token embeddings \(token_embd.weight\)")
