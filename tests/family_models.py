"""Tiny random checkpoints of every Llama-style family, built with transformers' own config classes.

Each case switches on what makes the family differ (grouped-query attention, a sliding window
shorter than the generated length, qkv bias, q/k norms, fused projections, soft-capping, rope
scaling, tied and untied heads). No pytest here: benchmarks may import it too.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

CASES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-yarn-bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=12)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=10,
                                                       max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, rope_scaling={"rope_type": "linear",
                                                                                  "factor": 2.0})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=20, pad_token_id=0, bos_token_id=1,
                                                   eos_token_id=2)),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        max_position_embeddings=128, original_max_position_embeddings=32, partial_rotary_factor=0.75,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
                      "long_factor": [1.5 + 0.2 * i for i in range(6)]},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=32, sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=10.0,
        tie_word_embeddings=False,  # a tied random Gemma repeats its last token under greedy decoding
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(num_hidden_layers=4, no_rope_layer_interval=2,
                                                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
"""name -> (transformers config class, model class, the family's features switched on)."""


def reinit_decoder_(model: torch.nn.Module, seed: int = 0, std: float = 0.25) -> torch.nn.Module:
    """Seeded weights large enough that greedy decoding of a random model varies (norms around
    their identity: 1 for Llama-style, 0 for Gemma's (1 + w))."""
    gen = torch.Generator().manual_seed(seed)
    offset = 0.0 if type(model).__name__.startswith("Gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(offset + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if offset else 0.3))  # Gemma scales it by sqrt(C)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def hf_family_model(name: str, seed: int = 0, **overrides):
    """A seeded random transformers model of case ``name`` (eval mode, fp32)."""
    import transformers

    config_cls, model_cls, extra = CASES[name]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    return reinit_decoder_(getattr(transformers, model_cls)(config), seed).eval()


def save_family(name: str, dest: Path, seed: int = 0, **overrides):
    """Write case ``name`` with save_pretrained into ``dest``; returns the transformers model."""
    model = hf_family_model(name, seed, **overrides)
    model.save_pretrained(dest)
    return model


def write_small_tokenizer(dest: Path, vocab_size: int = 320) -> None:
    """A real byte-level BPE ``tokenizer.json`` (+ tokenizer_config.json) of ``vocab_size`` tokens,
    trained on a few sentences, so a tiny family checkpoint is a complete model directory without
    ../shared. Its end-of-text token is ``</s>`` (id 0)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = ["the", "cat", "dog", "fox", "bird", "red", "blue", "green", "garden", "house", "park", "river",
             "runs", "sleeps", "to", "in", "and", "where", "does"]
    tok.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, trainer)
    tok.save(str(Path(dest) / "tokenizer.json"))
    (Path(dest) / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "</s>"}))


def token_ids(seed: int = 0) -> torch.Tensor:
    """(2, 24) seeded token ids: longer than every sliding window of the cases."""
    return torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(seed))


def write_decoder(name: str, path: Path, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Case ``name``, saved by transformers, with its matrices N(0, 0.08): for adapter and merge
    comparisons at 1e-5 (at the cases' 0.25 three random layers amplify float32 rounding towards
    1e-5 on their own)."""
    model = reinit_decoder_(hf_family_model(name, **overrides), seed=0, std=0.08)
    model.to(dtype).save_pretrained(path)
    return path


def load_with_peft_adapters(base: Path, root: Path, adapters: dict[str, dict], seed: int = 20, std: float = 0.1):
    """Our model of ``base`` holding PEFT-made adapters (``{name: LoraConfig kwargs}``, seeded random A and B
    of ``std``; DoRA magnitudes moved by N(0, 0.05)), saved under ``root / name`` and loaded by name."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loratune.adapters.peft_format import load_adapter
    from loratune.models import load_model

    model, _ = load_model(base)
    for i, (name, cfg) in enumerate(adapters.items()):
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**cfg))
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "magnitude" in n:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
                elif "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        peft.save_pretrained(root / name)
        load_adapter(model, root / name, name=name)
    return model


MIXED_ADAPTERS = {"a": dict(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]),
                  "b": dict(r=8, lora_alpha=8.0, target_modules=["q_proj", "v_proj"]),
                  "qonly": dict(r=6, lora_alpha=6.0, target_modules=["q_proj"]),
                  "dora": dict(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"], use_dora=True)}
"""Four adapters for serving tests: ranks 4, 6, 8, other targets, and a DoRA one."""


def banked_family(root: Path, family: str = "llama", adapters: dict[str, dict] = MIXED_ADAPTERS, **overrides):
    """A tiny model of case ``family`` (write_decoder) holding ``adapters`` made by PEFT, banked for per-row
    use, in eval mode."""
    from loratune.adapters.rows import build_banks

    model = load_with_peft_adapters(write_decoder(family, root / "base", **overrides), root, adapters)
    build_banks(model, list(adapters))
    return model.eval()



@contextlib.contextmanager
def only_adapter(model: torch.nn.Module, name: str | None):
    """Inside, ``model`` applies adapter ``name`` alone (None: the bare base)."""
    from loratune.adapters.lora import adapters_disabled
    from loratune.adapters.named import set_active_adapters

    if name is None:
        with adapters_disabled(model):
            yield
    else:
        set_active_adapters(model, name)
        yield


def generate_alone(model: torch.nn.Module, prompt: list[int], adapter: str | None, cfg, stop_ids=()) -> list[int]:
    """What ``generate`` gives ``prompt`` with ``adapter`` alone, up to its first stop id: the reference that
    serving (many adapters in one batch) must equal."""
    from loratune.generate import generate

    device = next(model.parameters()).device
    with only_adapter(model, adapter):
        out = generate(model, torch.tensor([prompt], device=device), cfg, eos_ids=list(stop_ids))[0].tolist()
    return out[:next((i for i, t in enumerate(out) if t in set(stop_ids)), len(out))]


def checkpoint_maker(tmp_path_factory):
    """case name (and config overrides) -> a tiny checkpoint directory (:func:`write_decoder`), each written once."""
    made: dict[str, Path] = {}

    def get(name: str, **overrides) -> Path:
        key = name + repr(sorted(overrides.items()))
        if key not in made:
            made[key] = write_decoder(name, tmp_path_factory.mktemp(name) / "base", **overrides)
        return made[key]
    return get
