"""loratune/models/compile.py: compiled blocks compute what the eager blocks compute, within stated tolerances.

The same weights, one copy with its blocks compiled: logits, the gradient of every trainable parameter,
and a 20-step loss curve of the real training step (AdamW, clipping) on batches of varying length,
for GPT-2 and a Llama-style family (Qwen3: grouped-query attention, q/k norms), in fp32 and bf16-true.
Then the variants: full fine-tuning, DoRA, QLoRA (NF4), activation recompute around compiled blocks,
the KV-cache path (generation stays eager), no recompiles as lengths vary, and the recipe field.

Tolerances. fp32: inductor fuses and reorders the reductions (norms, softmax, the LoRA adds), so values
agree to float32 rounding, not bit for bit: logits within 1e-4 absolute (they are of order 1; measured
1.4e-5), gradients within 1e-4 relative + 1e-5 absolute (measured 6e-6 of the largest), the loss curve within
2e-4 per step (measured 3e-5). bf16-true: a fused kernel keeps its intermediates in float32 where eager
rounds each op's output to bf16, so the two differ by bf16 rounding, which on these random models is large
(eager bf16 logits are up to 0.6 from float32's). The test is that compiling costs nothing in accuracy:
against the same model in float32, the compiled logits are at most 1.25x as far as eager's (measured
0.74-0.87x), the gradients too (as one vector over every trainable parameter), each gradient within 25% of
its largest element from eager's (measured 15%), and the compiled loss curve at most 1.5x as far from the
float32 curve as eager's (the two bf16 curves drift apart by rounding, each about as far from float32's:
bf16-mixed measured 0.075 and 0.079). Dropout is off: the compiled block draws its masks with inductor's
generator, not eager's (the same distribution, other masks). QLoRA is checked for exactness only: its NF4
dequantization breaks the block's graph (quant/nf4.py is not traceable as written), so it is not fused.
The first compile of each graph takes seconds to a minute on a CPU (inductor's disk cache makes the
next run fast); every test here that compiles is marked slow.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import randomize_lora_, reinit_
from family_models import BASE, CASES, reinit_decoder_
from loratune.adapters.lora import LoRAConfig
from loratune.adapters.targets import inject_lora
from loratune.adapters.trainable import set_trainable
from loratune.errors import ConfigError
from loratune.models import GPT2, GPT2Config
from loratune.models.compile import STATS, compile_blocks, compile_report, compiled
from loratune.models.recompute import set_activation_checkpointing
from loratune.models.registry import family_for_config
from loratune.recipe import Recipe, load_recipe
from loratune.train.loss import lm_loss_sum
from loratune.train.precision import store_in_bf16
from loratune.train.session import TrainingSession

V = 97
FP32 = dict(logits=dict(rtol=0, atol=1e-4), grad=dict(rtol=1e-4, atol=1e-5), curve=2e-4)
"""fp32: compiled against eager, directly (see the module docstring)."""
BF16 = dict(to_fp32=1.25, grad=0.25, curve=1.5)
"""bf16: compiled's distance from float32 against eager's (logits, gradients; the loss curve), and each
gradient's distance from eager's as a share of its largest element."""
LENGTHS = [24, 40, 17, 33, 40, 28, 12, 37, 21, 40, 30, 19, 40, 26, 35, 14, 40, 23, 31, 40]
"""The 20 steps' sequence lengths: varying, all on attention's short-sequence path."""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own graphs, counted from zero (and never hits dynamo's recompile limit,
    past which it would silently run eager and the comparison would prove nothing)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _gpt2(finetune: str = "lora", **lora) -> GPT2:
    torch.manual_seed(0)
    model = reinit_(GPT2(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=256, vocab_size=V)), seed=1)
    if finetune == "lora":
        inject_lora(model, LoRAConfig(**{"r": 4, "alpha": 8, "targets": ["q", "v", "attn.out", "mlp.fc"], **lora}))
        randomize_lora_(model, seed=2, std=0.5)  # B != 0: every A gets a gradient too
    set_trainable(model, finetune)
    return model.train()


def _decoder(case: str = "qwen3", finetune: str = "lora", **lora):
    import transformers

    config_cls, _, extra = CASES[case]
    hf = getattr(transformers, config_cls)(**{**BASE, **extra, "vocab_size": V}).to_dict()
    family = family_for_config(hf)
    torch.manual_seed(0)
    model = reinit_decoder_(family.build(family.config_from_hf(hf)), seed=1)
    if finetune == "lora":
        inject_lora(model, LoRAConfig(**{"r": 4, "alpha": 8, "targets": ["q", "k", "v", "o", "gate"], **lora}))
        randomize_lora_(model, seed=2, std=0.5)
    set_trainable(model, finetune)
    return model.train()


def _pair(model, dtype: torch.dtype = torch.float32, finetune: str = "lora"):
    """(eager, compiled, float32 reference): the same weights (bf16: the frozen ones stored in bf16, as
    bf16-true does; the reference keeps them in float32)."""
    ref = copy.deepcopy(model)
    if dtype == torch.bfloat16:
        store_in_bf16(model, finetune)
    fast = copy.deepcopy(model)
    assert compile_blocks(fast) == len(_blocks(fast))
    assert compiled(fast) and not compiled(model)
    return model, fast, ref


def _blocks(model):
    from loratune.models.compile import BLOCK_TYPES

    return [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]


def _data(B: int = 2, T: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def _logits_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, ids, labels, None) / labels.numel()
    loss.backward()
    with torch.no_grad():
        logits = model(ids).float()
    return logits, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(eager, fast, ref, dtype: torch.dtype = torch.float32) -> None:
    ids, labels = (t.to(next(eager.parameters()).device) for t in _data())
    logits_e, grads_e = _logits_and_grads(eager, ids, labels)
    logits_c, grads_c = _logits_and_grads(fast, ids, labels)
    assert logits_e.abs().max() > 0.5  # logits of order 1: the absolute tolerance is a relative one
    assert grads_c.keys() == grads_e.keys() and grads_e
    assert min(g.abs().max().item() for g in grads_e.values()) > 1e-3  # every gradient is well above the tolerance
    if dtype == torch.float32:
        torch.testing.assert_close(logits_c, logits_e, **FP32["logits"])
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], **FP32["grad"], msg=name)
        return
    logits_r, grads_r = _logits_and_grads(ref, ids, labels)
    far_c, far_e = (logits_c - logits_r).abs().max().item(), (logits_e - logits_r).abs().max().item()
    assert far_c <= BF16["to_fp32"] * far_e, f"logits: compiled {far_c:.3g} from float32, eager {far_e:.3g}"
    far_c, far_e = (_distance(grads_c, grads_r), _distance(grads_e, grads_r))
    assert far_c <= BF16["to_fp32"] * far_e, f"gradients: compiled {far_c:.3g} from float32, eager {far_e:.3g}"
    for name in grads_e:
        err, scale = (grads_c[name] - grads_e[name]).abs().max().item(), grads_e[name].abs().max().item()
        assert err <= BF16["grad"] * scale, f"{name}: {err:.3g} > {BF16['grad']} x {scale:.3g}"


def _distance(grads: dict, ref: dict) -> float:
    return sum(((grads[n] - ref[n]) ** 2).sum().item() for n in ref) ** 0.5


def _learnable(T: int, seed: int, B: int = 2) -> dict[str, torch.Tensor]:
    """A batch worth learning: rows stepping through the vocabulary by 7, each label a fixed function of its token."""
    start = torch.randint(0, V, (B, 1), generator=torch.Generator().manual_seed(seed))
    ids = (start + 7 * torch.arange(T)) % V  # (B, T)
    return {"input_ids": ids, "labels": (5 * ids + 3) % V}


def _curve(model, precision: str, steps: int = 20) -> list[float]:
    """Losses of the training step ``loratune train`` runs, on batches of the lengths in LENGTHS."""
    device = next(model.parameters()).device
    recipe = Recipe(precision=precision, device=str(device), lr=1e-2, batch_size=2, max_grad_norm=1.0)
    session = TrainingSession(recipe=recipe, device=device, model=model, schedule=False)
    return [session.step(_learnable(LENGTHS[step], seed=100 + step)).loss for step in range(steps)]


def _assert_curves_close(eager, fast, ref, dtype: torch.dtype = torch.float32) -> None:
    precision = "bf16-true" if dtype == torch.bfloat16 else "fp32"
    curve_e, curve_c = _curve(eager, precision), _curve(fast, precision)
    assert curve_e[-1] < curve_e[0] - 0.3  # it trains: the curve is worth comparing
    if dtype == torch.float32:
        diff = max(abs(a - b) for a, b in zip(curve_c, curve_e))
        assert diff <= FP32["curve"], f"loss curves differ by {diff:.3g}: {curve_c} vs {curve_e}"
        return
    _assert_no_farther_from_fp32(curve_c, curve_e, _curve(ref, "fp32"))


def _assert_no_farther_from_fp32(curve_c: list[float], curve_e: list[float], curve_fp32: list[float]) -> None:
    """bf16 curves: compiled's largest distance from the float32 curve within 1.5x eager's."""
    far_c, far_e = (max(abs(a - b) for a, b in zip(c, curve_fp32)) for c in (curve_c, curve_e))
    assert far_c <= BF16["curve"] * far_e, f"from float32's curve: compiled {far_c:.3g}, eager {far_e:.3g}"


def _assert_clean_compile(max_graphs: int) -> None:
    """It compiled (so the comparison was against compiled code), without graph breaks, in few graphs:
    one per kind of call (the first block's input needs no gradient; evaluation's no_grad), never one per
    sequence length."""
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= max_graphs, f"{graphs} graphs"
    assert not counters["graph_break"], list(counters["graph_break"])


# --- the same logits, gradients and loss curve --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpt2_lora_same_as_eager(dtype):
    eager, fast, ref = _pair(_gpt2(), dtype)
    _assert_same(eager, fast, ref, dtype)
    _assert_curves_close(eager, fast, ref, dtype)
    _assert_clean_compile(max_graphs=3)  # first block / the others, and the no_grad logits


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qwen3_lora_same_as_eager(dtype):
    eager, fast, ref = _pair(_decoder("qwen3"), dtype)
    _assert_same(eager, fast, ref, dtype)
    _assert_curves_close(eager, fast, ref, dtype)
    _assert_clean_compile(max_graphs=3)


@pytest.mark.slow
def test_bf16_mixed_loss_curve_same_as_eager():
    """Autocast around compiled blocks: the curve no farther from eager's than eager's is from float32's."""
    eager, fast, ref = _pair(_gpt2())
    curve_e, curve_c = _curve(eager, "bf16-mixed"), _curve(fast, "bf16-mixed")
    assert curve_e[-1] < curve_e[0] - 0.3
    _assert_no_farther_from_fp32(curve_c, curve_e, _curve(ref, "fp32"))  # measured: 0.075 and 0.079


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_cuda_same_as_eager(family, dtype):
    """The same checks on a GPU (inductor's Triton kernels), with the same tolerances."""
    eager, fast, ref = _pair((_gpt2() if family == "gpt2" else _decoder("qwen3")).to("cuda"), dtype)
    _assert_same(eager, fast, ref, dtype)
    _assert_curves_close(eager, fast, ref, dtype)


# --- full fine-tuning, the adapter variants, QLoRA, recompute -------------------------------------

@pytest.mark.slow
def test_full_fine_tuning_same_as_eager():
    _assert_same(*_pair(_decoder("llama", "full"), finetune="full"))
    _assert_clean_compile(max_graphs=3)


@pytest.mark.slow
def test_dora_same_as_eager():
    _assert_same(*_pair(_gpt2(use_dora=True)))
    _assert_clean_compile(max_graphs=3)


@pytest.mark.slow
def test_qlora_nf4_same_as_eager():
    """The NF4 base dequantized inside the compiled block: the same products as eager's."""
    from loratune.quant.model import QuantConfig, quantize_model

    model = _decoder("qwen3")
    assert quantize_model(model, QuantConfig("nf4")) > 0
    _assert_same(*_pair(model))
    assert counters["stats"]["unique_graphs"] > 0


@pytest.mark.slow
def test_recompute_around_compiled_blocks_same_as_eager():
    eager, fast, ref = _pair(_decoder("qwen3"))
    set_activation_checkpointing(fast, True)
    _assert_same(eager, fast, ref)


# --- shapes, the cache path, the report -----------------------------------------------------------

@pytest.mark.slow
def test_varying_lengths_do_not_recompile():
    fast = _pair(_gpt2())[1]
    lm_loss_sum(fast, *_data(T=20), None).backward()
    first = counters["stats"]["unique_graphs"]
    for T in (31, 9, 64, 47, 128, 2):  # every length up to attention.MATMUL_MAX_T: the same graphs
        lm_loss_sum(fast, *_data(T=T), None).backward()
    assert counters["stats"]["unique_graphs"] == first
    lm_loss_sum(fast, *_data(T=200), None).backward()  # past it, attention's SDPA path: its own graphs, once
    after_long = counters["stats"]["unique_graphs"]
    for T in (150, 256):
        lm_loss_sum(fast, *_data(T=T), None).backward()
    assert counters["stats"]["unique_graphs"] == after_long
    report = compile_report(fast)
    assert report is not None and report["compile_graphs"] >= after_long and report["compile_s"] > 0
    assert compile_report(fast) is None  # nothing compiled since


@pytest.mark.slow
def test_generation_with_a_kv_cache_runs_eager():
    from loratune.generate.sampling import SamplingConfig, generate

    eager, fast, _ = _pair(_gpt2())
    eager.eval(), fast.eval()
    prompt = torch.tensor([[5, 17, 33, 2]])
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)
    before = counters["stats"]["unique_graphs"]
    assert generate(fast, prompt, config).tolist() == generate(eager, prompt, config).tolist()
    assert counters["stats"]["unique_graphs"] == before  # the cached decode steps never compiled


def test_off_restores_the_eager_blocks():
    model = _gpt2()
    compile_blocks(model)
    compile_blocks(model, False)
    assert not compiled(model)
    with pytest.raises(ConfigError, match="compiles the transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_compile_report_is_none_without_compiled_blocks():
    assert compile_report(_gpt2()) is None
    assert STATS.graphs >= 0


# --- the recipe field ----------------------------------------------------------------------------

def test_recipe_field_parses_and_validates():
    assert Recipe().compile is False
    assert load_recipe(None, ["compile=true"]).compile is True
    with pytest.raises(ConfigError, match="compile must be true or false"):
        Recipe(compile="yes please")
    with pytest.raises(ConfigError, match="compile: true .* strategy: ddp"):
        load_recipe(None, ["compile=true", "strategy=fsdp"])


def test_setup_model_compiles_the_blocks(tiny_ckpt):
    from loratune.train.session import setup_model

    common = [f"model={tiny_ckpt}", "device=cpu", "precision=fp32", "seq_len=32"]
    assert compiled(setup_model(load_recipe(None, common + ["compile=true"]), torch.device("cpu"))[0])
    assert not compiled(setup_model(load_recipe(None, common), torch.device("cpu"))[0])


def _run_settings(tiny_ckpt, tmp_path) -> list[str]:
    """A 3-step LoRA run of the tiny GPT-2 on a few sentences, every step logged."""
    import json

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"the {c} fox jumps over the {d} dog number {i}."}) + "\n"
                            for i, (c, d) in enumerate([("red", "lazy"), ("quick", "old"), ("brown", "big")] * 20)))
    return ["data.text_field=text", f"data.source={data}", "seq_len=16", "batch_size=4", "max_steps=3",
            "log_every=1", "eval_every=0", "data.val_fraction=0", "sample_tokens=2", "precision=fp32",
            "device=cpu", f"model={tiny_ckpt}", "lora.dropout=0"]


def _assert_same_run(fast: Path, eager: Path) -> None:
    """The same losses (fp32 curve tolerance) and adapter tensors (fp32 gradient tolerance)."""
    from safetensors.torch import load_file

    from loratune.train.metrics import read_metrics

    losses = {d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (fast, eager)}
    assert len(losses[eager]) == 3 and len(losses[fast]) == 3
    for a, b in zip(losses[fast], losses[eager]):
        assert abs(a - b) <= FP32["curve"], losses
    x, y = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (fast, eager))
    assert x.keys() == y.keys()
    for key in y:
        torch.testing.assert_close(x[key], y[key], **FP32["grad"], msg=key)


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_run_and_reports_its_compile(tiny_ckpt, tmp_path):
    """``loratune train`` with compile: true: the same losses and adapter as eager, and a metrics.jsonl line
    after the first step with the compile time and graph count."""
    from loratune.train import train
    from loratune.train.metrics import read_metrics

    settings = _run_settings(tiny_ckpt, tmp_path)
    for name, extra in (("eager", []), ("compiled", ["compile=true"])):
        train(load_recipe(None, [*settings, *extra, f"out_dir={tmp_path / name}"]), progress=False)
    _assert_same_run(tmp_path / "compiled", tmp_path / "eager")
    reports = [r for r in read_metrics(tmp_path / "compiled" / "metrics.jsonl") if "compile_s" in r]
    assert reports and reports[0]["step"] == 1 and reports[0]["compile_graphs"] >= 2 and reports[0]["compile_s"] > 0
    assert not any("compile_s" in r for r in read_metrics(tmp_path / "eager" / "metrics.jsonl"))


@pytest.mark.slow
def test_ddp_with_compiled_blocks_equals_one_eager_process(tiny_ckpt, tmp_path):
    """``torchrun --nproc-per-node 2`` (gloo, DDP) with compile: true: each rank's compiled blocks inside DDP,
    the gradients all-reduced as usual; the same run as one eager process."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    from loratune.train import train

    settings = _run_settings(tiny_ckpt, tmp_path)
    train(load_recipe(None, [*settings, f"out_dir={tmp_path / 'eager'}"]), progress=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("compile: true\nstrategy: ddp\n", encoding="utf-8")
    sets = [a for s in settings for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "loratune", "train",
                           str(recipe), "--out", str(tmp_path / "ddp"), "--no-progress", *sets],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LORATUNE_DIST_TIMEOUT": "300"})
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(tmp_path / "ddp", tmp_path / "eager")
    from loratune.train.metrics import read_metrics

    assert any("compile_s" in r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl"))  # it did compile


def test_a_cpu_without_a_cpp_compiler_is_refused(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        compile_blocks(_gpt2())
