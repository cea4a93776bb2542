"""The CUDA path, checked on a GPU against the references: run it where a GPU is present.

    [LORATUNE_BENCH_TOKENIZER=<dir with encoder.json + vocab.bpe>] python benchmarks/gpu_check.py [cuda|cpu]

Each check prints PASS or FAIL with its measured difference; the exit status is the number of
failures. The model is a small random GPT-2 with large weights (matrices std 0.2, embeddings 0.1,
tests/weights.py's ``reinit_``, as the tests use), saved by transformers and loaded by both sides: at GPT-2's
own 0.02 a random model's logits are nearly flat and greedy decoding repeats one token, so
agreement would prove little. Every comparison is relative (to the reference's norm or largest
value), and the checks that could pass vacuously are guarded: the LoRA adapter must change the
logits by far more than the tolerance it is compared with, and the greedy generations must be
varied as well as identical.

Checks: our GPT-2's logits against transformers' (fp32 and bf16); LoRA q,v against PEFT's
equivalent c_attn adapter; greedy generation against transformers' ``generate``; a short
``train()`` (bf16-mixed) whose validation loss must fall and whose adapter must have trained,
change the logits, and load in PEFT with our logits; DDP and FSDP2 through ``torchrun
--nproc-per-node 1`` (NCCL on CUDA) against the one-process adapter; the serving engine (mixed adapters, DoRA
among them) against ``generate`` alone. ``cpu`` dry-runs the script itself; the
tests never need a GPU (they check the frozen base stays bit-identical); this script is what was
run on one.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import common  # this folder is on sys.path when run as a script; common finds loratune when it is not installed
from common import DATA, copy_gpt2_tokenizer

reinit_ = common.tests_module("weights").reinit_  # tests/weights.py, the tests' large seeded weights

FAILURES: list[str] = []
REL_L2_LIMIT = 1e-5
"""fp32 agreement, relative L2 (||ours - ref|| / ||ref||): with transformers and with PEFT."""
REL_MAX_LIMIT = 1e-4
"""fp32 agreement, largest difference over the reference's largest value (outliers the L2 hides)."""
ADAPTER_EFFECT_MIN = 1e-2
"""An adapter under test must move the logits by at least this (relative L2): 1,000x the 1e-5 it is
compared to PEFT with, so agreement cannot come from an adapter that does nothing."""


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def _limits() -> str:
    return f"(limits {REL_L2_LIMIT:.0e} and {REL_MAX_LIMIT:.0e})"


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||, in float32."""
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm())


def rel_max(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in float32."""
    a, ref = a.float(), ref.float()
    return float((a - ref).abs().max() / ref.abs().max())


def main() -> int:
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from loratune.adapters.lora import LoRAConfig, lora_layers, merge_lora
    from loratune.adapters.peft_format import load_adapter, save_adapter
    from loratune.adapters.targets import inject_lora
    from loratune.generate import SamplingConfig, generate
    from loratune.models import load_model

    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")  # "cpu" dry-runs the script itself
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="loratune-gpu-"))
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=256, n_layer=4, n_head=8, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    ckpt = tmp / "model"
    reinit_(GPT2LMHeadModel(cfg)).save_pretrained(ckpt)
    copy_gpt2_tokenizer(ckpt)
    hf = GPT2LMHeadModel.from_pretrained(ckpt).to(dev).eval()  # both sides read the saved weights
    ids = torch.randint(0, 50257, (4, 96), generator=torch.Generator().manual_seed(1)).to(dev)

    # 1. logits vs transformers, fp32 and bf16 (the reference cast to bf16 too)
    ours, _ = load_model(ckpt, device=dev)
    ours.to(dev).eval()
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    spread = float(ref.float().std(dim=-1).mean())
    d_l2, d_max = rel_l2(got, ref), rel_max(got, ref)
    check("logits fp32 vs transformers", d_l2 < REL_L2_LIMIT and d_max < REL_MAX_LIMIT,
          f"relative L2 diff {d_l2:.2e}, max abs diff / max abs {d_max:.2e} {_limits()}; TF32 off by default; "
          f"reference logits std over the vocabulary {spread:.2f}")
    with torch.no_grad():
        a = ours.to(torch.bfloat16)(ids).float()
        b = hf.to(torch.bfloat16)(ids).logits.float()
    d_l2, d_max = rel_l2(a, b), rel_max(a, b)
    check("logits bf16 vs transformers bf16", d_l2 < 2e-2 and d_max < 5e-2,
          f"relative L2 diff {d_l2:.2e} (limit 2e-2), max abs diff / max abs {d_max:.2e} (limit 5e-2)")
    ours, _ = load_model(ckpt, device=dev)  # fresh fp32 weights (the bf16 round trip above was lossy)
    ours.to(dev).eval()

    # 2. LoRA q,v vs PEFT's c_attn adapter with the same update (our export of q/v slices)
    lora_cfg = LoRAConfig(r=4, alpha=32, targets=["q", "v"])
    inject_lora(ours, lora_cfg)
    gen = torch.Generator(device="cpu").manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            for p in (*layer.lora_A.values(), *layer.lora_B.values()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ours.to(dev)
    save_adapter(ours, tmp / "adapter", lora_cfg, base_model=str(ckpt))
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(ckpt), tmp / "adapter").to(dev).eval()
    with torch.no_grad():
        a, b = ours(ids), peft_model(input_ids=ids).logits
    d_l2, d_max = rel_l2(a, b), rel_max(a, b)
    effect = rel_l2(b, ref)  # PEFT's logits with the adapter against the base model's (fp32, section 1)
    check("LoRA q,v vs PEFT", d_l2 < REL_L2_LIMIT and d_max < REL_MAX_LIMIT,
          f"relative L2 diff {d_l2:.2e}, max abs diff / max abs {d_max:.2e} {_limits()}")
    check("LoRA q,v: the adapter changes the logits", effect > ADAPTER_EFFECT_MIN,
          f"relative L2 change with vs without the adapter {effect:.2e} (must exceed {ADAPTER_EFFECT_MIN:.0e}, "
          f"{ADAPTER_EFFECT_MIN / REL_L2_LIMIT:.0f}x the PEFT limit)")

    # 3. greedy generation vs transformers' generate (the adapter merged into both)
    merge_lora(ours)
    merged = peft_model.merge_and_unload().eval()
    prompt = ids[:2, :16]
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.0)
    a = generate(ours, prompt, sampling)
    b = merged.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=48,
                        min_new_tokens=48, pad_token_id=50256)[:, 16:]
    same = int((a == b).all(dim=1).sum()) if a.shape == b.shape else 0
    distinct = [len(set(row.tolist())) for row in a]
    check("greedy generation vs transformers", same == 2 and a.shape[1] == 48,
          f"{same}/2 sequences identical over {a.shape[1]} tokens")
    check("greedy generation is not degenerate", min(distinct) >= 8,
          f"distinct token ids per 48-token sequence: {distinct} (at least 8 each)")

    # 4. a real training run: loss falls, the adapter it writes loads in PEFT with our logits
    from loratune.recipe import load_recipe
    from loratune.train import train

    data = DATA
    if not data.is_file():
        print(f"SKIP  training: no data at {data}")
    else:
        recipe = load_recipe(None, [f"model={ckpt}", f"out_dir={tmp / 'run'}", f"device={dev}", "precision=bf16-mixed",
                                    f"data.source={data}", "data.text_field=documents", "data.val_fraction=0.1",
                                    "seq_len=128", "batch_size=16", "max_steps=60", "lr=2e-3", "eval_every=30",
                                    "eval_batches=null", "save_every=30", "log_every=10", "sample_tokens=16"])
        result = train(recipe, progress=False)
        evals = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        vals = [e["val_loss"] for e in evals if "val_loss" in e]
        check("training: validation loss falls", len(vals) >= 2 and vals[-1] < vals[0],
              f"val loss {vals[0]:.4f} -> {vals[-1]:.4f}; {result.steps} steps in {result.seconds:.1f} s; "
              f"peak {result.peak_memory / 2**20:.0f} MiB")
        trained, _ = load_model(ckpt, device=dev)
        load_adapter(trained, tmp / "run" / "adapter")
        trained.to(dev).eval()
        with torch.no_grad():
            b_norm = sum(float(b.norm()) for _, layer in lora_layers(trained) for b in layer.lora_B.values())
        peft_trained = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(ckpt), tmp / "run" / "adapter")
        peft_trained = peft_trained.to(dev).eval()
        with torch.no_grad():
            a, b = trained(ids), peft_trained(input_ids=ids).logits
        d_l2, d_max = rel_l2(a, b), rel_max(a, b)
        effect = rel_l2(b, ref)
        check("training: the adapter trained and changes the logits", b_norm > 0 and effect > ADAPTER_EFFECT_MIN,
              f"sum of |B| {b_norm:.3f} (0 before training); relative L2 change of the logits with vs without "
              f"it {effect:.2e} (must exceed {ADAPTER_EFFECT_MIN:.0e})")
        check("training: the adapter loads in PEFT with our logits", d_l2 < REL_L2_LIMIT and d_max < REL_MAX_LIMIT,
              f"relative L2 diff to PEFT {d_l2:.2e}, max abs diff / max abs {d_max:.2e} {_limits()}")
        torchrun_checks(ckpt, tmp, dev)
    serve_checks(ckpt, tmp, dev)
    print(f"{len(FAILURES)} failure(s)" + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    return len(FAILURES)


def torchrun_checks(ckpt: Path, tmp: Path, dev: str) -> None:
    """5. DDP and FSDP2 through torchrun (world size 1; NCCL on CUDA) give the one-process adapter."""
    import os
    import socket
    import subprocess

    from safetensors.torch import load_file

    from loratune.recipe import load_recipe
    from loratune.train import train

    sets = [f"model={ckpt}", f"device={dev}", "precision=fp32", f"data.source={DATA}", "data.text_field=documents",
            "data.val_fraction=0", "seq_len=128", "batch_size=16", "max_steps=20", "lr=2e-3", "lora.dropout=0",
            "eval_every=0", "save_every=10", "log_every=10", "sample_tokens=8"]
    train(load_recipe(None, [*sets, f"out_dir={tmp / 'one'}"]), progress=False)
    one = load_file(str(tmp / "one" / "adapter" / "adapter_model.safetensors"))
    for strategy in ("ddp", "fsdp"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        recipe = Path(__file__).resolve().parents[1] / "recipes" / "gpt2_reddit_tifu.yaml"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-addr=127.0.0.1",
               f"--master-port={port}", "-m", "loratune", "train", str(recipe), "--no-progress",
               *[a for x in [*sets, f"out_dir={tmp / strategy}", f"strategy={strategy}"] for a in ("--set", x)]]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            check(f"torchrun {strategy}: trains", False, done.stderr.strip()[-300:])
            continue
        theirs = load_file(str(tmp / strategy / "adapter" / "adapter_model.safetensors"))
        diff = max(float((one[k] - theirs[k]).abs().max()) for k in one)
        check(f"torchrun {strategy} (world size 1, {dev}): the one-process adapter", diff < 1e-5,
              f"max |difference| {diff:.2e} after 20 steps (must be < 1e-5)")



def serve_checks(ckpt: Path, tmp: Path, dev: torch.device) -> None:
    """6. The serving engine on the device: 12 requests over 3 adapters (one DoRA) and the base, through 4 slots,
    each equal to greedy ``generate`` with its adapter alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    from family_models import generate_alone

    from loratune.generate import SamplingConfig
    from loratune.models import load_model
    from loratune.serve.adapters import AdapterRegistry
    from loratune.generate.engine import Engine, Request

    model, _ = load_model(ckpt, device=dev)
    model.to(dev).eval()
    registry = AdapterRegistry(model, "base", None, 3)
    for i, dora in enumerate([False, False, True]):
        peft = get_peft_model(GPT2LMHeadModel.from_pretrained(ckpt), LoraConfig(
            r=4 + 2 * i, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=dora))
        gen = torch.Generator().manual_seed(50 + i)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n and "magnitude" not in n:  # DoRA's magnitudes stay PEFT's (the base's row norms)
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft.save_pretrained(tmp / f"serve-{i}")
        registry.load(f"s{i}", tmp / f"serve-{i}", set(), trusted=True)
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(4, 40, (12,), generator=gen).tolist()
    requests = [Request(torch.randint(0, 50257, (n,), generator=gen).tolist(), [None, "s0", "s1", "s2"][i % 4],
                        SamplingConfig(max_new_tokens=12, temperature=0.0)) for i, n in enumerate(lengths)]
    engine, answers = Engine(model, max_batch=4, prefill_tokens=64), {}
    for r in requests:
        engine.submit(r)
    while engine.busy():
        answers.update({f.request.id: f.tokens for f in engine.step()[1]})
    same = sum(answers.get(r.id) == generate_alone(model, r.prompt, r.adapter, r.sampling) for r in requests)
    varied = len({tuple(a) for a in answers.values()})
    check(f"serving engine ({dev}): mixed adapters equal generate alone", same == len(requests) and varied > 6,
          f"{same} of {len(requests)} answers equal, {varied} different answers")


if __name__ == "__main__":
    sys.exit(main())
