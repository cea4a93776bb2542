"""The Llama-style families in benchmarks/bench_train.py: checkpoints, the peer, FLOPs and the matmul peak.

A ``--sizes`` name here (``smollm2-135m``, ``qwen3-0.6b``) is a random model of that family at
its real shapes (loratune's preset of the same name), written once by loratune's ``init-model``
path (``family.build(config).init_weights(0)`` + ``save_hf_model``) in Hugging Face format, with a
real tokenizer from ../shared/tokenizers; both sides load those same files. SmolLM2's own
49,152-token tokenizer is not among the shared ones, so its shape gets Llama 2's 32,000-token
tokenizer (which fits its embedding; ids 1 / 2 are BOS / EOS in both). Without ../shared the
family rows are skipped with a message.

The peer is ``AutoModelForCausalLM`` with SDPA attention + PEFT ``LoraConfig(target_modules=
["q_proj", "v_proj"])``, the same adapters as loratune's ``lora.targets=q,v`` on these families.

Roofline: each row's tokens/s times its model FLOPs per token, as a share of the matmul rate
measured on this machine in the row's precision (:func:`matmul_rate`), with FLOPs per token
(:func:`train_flops_per_token`)

    full:  6 N + 6 L T q          LoRA:  4 N + 6 L T q + 6 r (in + out) per adapted projection

where N is the weights of every matrix product (the projections and the output head; not the
embedding lookup), L layers, T the sequence length, q the query width (heads x head size). A
forward pass is 2 N; its backward 2 N for the input gradients plus, for full fine-tuning, 2 N for
the weight gradients (frozen weights need none). Causal attention is 2 T q per layer forward
(q k^T and p v over T / 2 keys on average), twice that backward.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = Path(os.environ.get("LORATUNE_BENCH_TOKENIZERS", ROOT.parent / "shared" / "tokenizers"))
FAMILY_SIZES = {
    "smollm2-135m": ("llama", "smollm2-135m", "llama2"),
    "qwen3-0.6b": ("qwen3", "qwen3-0.6b", "qwen3"),
}
"""--sizes name -> (model_type, loratune preset, ../shared/tokenizers folder)."""
LORA_TARGETS = {"lora-qv": ["q_proj", "v_proj"]}
"""The peer's PEFT target_modules per case on these families (loratune: lora.targets=q,v)."""
MATMUL_SHAPE = (1024, 768, 3072)
"""(M, K, N) of the product :func:`matmul_rate` times: GPT-2-124M's MLP on 1,024 tokens."""


def is_family(size: str) -> bool:
    return size in FAMILY_SIZES


def skip_reason(size: str) -> str | None:
    """Why this family size cannot run here (its tokenizer folder is absent), or None."""
    folder = TOKENIZERS / FAMILY_SIZES[size][2]
    return None if (folder / "tokenizer.json").is_file() else f"{folder} is absent: {size} rows skipped"


def make_family_checkpoint(size: str, cache: Path) -> Path:
    """A random model of this size in Hugging Face format, with its real tokenizer; made once per cache."""
    out = cache / f"{size}-random"
    if (out / "model.safetensors").exists():
        return out
    import torch

    from loratune.hub.export import save_hf_model
    from loratune.models.registry import FAMILIES

    model_type, preset, tokenizer = FAMILY_SIZES[size]
    family = FAMILIES[model_type]
    config = family.config_from_hf({"model_type": model_type, **family.presets[preset]})
    with torch.device("meta"):
        model = family.build(config)
    model = model.to_empty(device="cpu")  # no default init: init_weights draws every weight
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty gives the tied head its own tensor
    model.init_weights(seed=0)
    save_hf_model(model, out, tokenizer_dir=TOKENIZERS / tokenizer)
    return out


def build_family_peer(ckpt: Path, case: str, precision: str, r: int, alpha: float, device: str = "cpu"):
    """transformers' model of the checkpoint (SDPA attention), in bf16 for bf16-true, with PEFT's adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32).to(device)
    model.config.use_cache = False  # training: no KV cache
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if case != "full":
        from peft import LoraConfig, get_peft_model

        if case not in LORA_TARGETS:
            raise ValueError(f"case {case} is GPT-2's; Llama-style families run lora-qv and full")
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS[case], lora_dropout=0.0,
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)  # adapters stay float32 (autocast_adapter_dtype)
    return model.to(device)


def hf_config(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "config.json").read_text())


def shapes(cfg: dict) -> dict:
    """Layers, widths and vocabulary of a config.json (GPT-2's names or Llama-style ones)."""
    if cfg.get("model_type") == "gpt2":
        C = cfg["n_embd"]
        return {"L": cfg["n_layer"], "C": C, "q": C, "kv": C, "F": 4 * C, "V": cfg["vocab_size"]}
    C, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hs = cfg.get("head_dim") or C // heads
    return {"L": cfg["num_hidden_layers"], "C": C, "q": heads * hs, "kv": cfg.get("num_key_value_heads", heads) * hs,
                "F": cfg["intermediate_size"], "V": cfg["vocab_size"]}


def matmul_params(cfg: dict) -> int:
    """N: weights of every matrix product of one token's forward pass (projections + output head)."""
    s = shapes(cfg)
    mlp = 2 * s["C"] * s["F"] if cfg.get("model_type") == "gpt2" else 3 * s["C"] * s["F"]
    return s["L"] * (2 * s["C"] * s["q"] + 2 * s["C"] * s["kv"] + mlp) + s["V"] * s["C"]


def train_flops_per_token(cfg: dict, case: str, seq: int, r: int = 4) -> float:
    """Model FLOPs per trained token (see the module docstring for the formula)."""
    s = shapes(cfg)
    attention = 6 * s["L"] * seq * s["q"]
    if case == "full":
        return 6 * matmul_params(cfg) + attention
    adapters = s["L"] * 6 * r * ((s["C"] + s["q"]) + (s["C"] + s["kv"]))  # q: C -> q, v: C -> kv
    return 4 * matmul_params(cfg) + attention + adapters


def matmul_rate(repeats: int = 20, clock: str = "wall") -> dict:
    """GFLOP/s of one (M, K) x (K, N) product (:data:`MATMUL_SHAPE`) in fp32 and bf16, median of ``repeats``,
    timed by the wall clock or (``clock="cpu"``) the process's CPU time, as the jobs are."""
    import torch

    M, K, N = MATMUL_SHAPE
    timer = time.process_time if clock == "cpu" else time.perf_counter
    out = {"shape": "x".join(map(str, MATMUL_SHAPE)), "threads": torch.get_num_threads(), "clock": clock}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
        t0 = timer()
        a @ b
        first = timer() - t0
        for _ in range(2 if first < 0.5 else 0):
            a @ b
        times = []  # a precision without matrix units (bf16 on AVX2: ~1 GFLOP/s, 5 s a product) gets one more run
        for _ in range(repeats if first < 0.5 else 1):
            t0 = timer()
            a @ b
            times.append(timer() - t0)
        out[f"{name}_gflops"] = 2 * M * K * N / statistics.median(times) / 1e9
    return out


def roofline(row_side: dict, flops_per_token: float, rates: dict, precision: str) -> float | None:
    """Share of the measured matmul rate that a side's tokens/s amounts to, in the row's precision."""
    rate = rates.get("fp32_gflops" if precision == "fp32" else "bf16_gflops")
    tps = row_side.get("tokens_per_s")
    return tps * flops_per_token / (rate * 1e9) if tps and rate else None


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> list[str]:
    """The CPU's matrix-unit flags (amx_bf16, avx512_bf16 ...) from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("amx", "avx512_bf16")))
    except OSError:
        pass
    return []
