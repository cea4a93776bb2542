"""Compiled blocks (the recipe's ``compile: true``, loratune/models/compile.py) against eager, per shape.

Each row is one job in a fresh process (its peak RSS and its compile are its own): a random model of a
published shape made ready as ``loratune train`` makes it (LoRA q,v r=4, the recipe's precision,
QLoRA's NF4 base where asked), the training step of a :class:`~loratune.train.session.TrainingSession`
on random token ids, ``--steps`` timed steps after one untimed warm-up step. For the compiled job the
warm-up step is the one that compiles: its compile time is that step's wall time minus a steady step's,
and also dynamo's and inductor's own timers (``models.compile.STATS``). Single runs, under the CPU lock.

Roofline share as bench_families.py: tokens/s x model FLOPs per token over the matmul rate measured here
in the row's precision (on a CPU without AMX, bf16 matmuls run far below fp32's).

    python benchmarks/bench_compile.py --shapes gpt2-124m smollm2-135m --precisions fp32
    python benchmarks/bench_compile.py --render   # the table of benchmarks/results/compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import bench_families as families
import common

OUT = common.ROOT / "benchmarks" / "results" / "compile.json"
SHAPES = {
    "gpt2-124m": ("gpt2", "gpt2", 8, 128),
    "smollm2-135m": ("llama", "smollm2-135m", 2, 512),
    "qwen3-0.6b": ("qwen3", "qwen3-0.6b", 2, 512),
    "gpt2-tiny": ("gpt2", "tiny", 2, 64),
}
"""--shapes name -> (model_type, loratune preset, batch, seq): GPT-2 at the tutorial recipe's seq_len 128
(batch 8 of its 32: the same cost per token), the Llama-style shapes at seq 512; gpt2-tiny: a smoke test."""


def worker(job: dict) -> dict:
    import torch

    from loratune.adapters.lora import LoRAConfig
    from loratune.models.compile import STATS, compile_blocks
    from loratune.models.registry import find_family
    from loratune.quant.model import QuantConfig, cast_base, quantize_model
    from loratune.recipe import Recipe

    torch.set_num_threads(job["threads"])
    model_type, preset, batch, seq = SHAPES[job["shape"]]
    recipe = Recipe(precision=job["precision"], device="cpu", lr=1e-4, batch_size=batch, seq_len=seq,
                    quantize=job["quantize"], lora=LoRAConfig(r=4, alpha=8, targets=["q", "v"]))
    model = common.ready_model(model_type, find_family(model_type).presets[preset], recipe)
    if job["quantize"] != "none":
        quantize_model(model, QuantConfig(job["quantize"]))
        cast_base(model, torch.bfloat16 if job["precision"] == "bf16-true" else torch.float32)
    if job["compile"]:
        compile_blocks(model)
    session = common.session(model, recipe)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [common.lm_batch(torch.randint(0, vocab, (batch, seq + 1), generator=gen)) for _ in range(2)]
    t0 = time.perf_counter()
    session.step(batches[0])
    first = time.perf_counter() - t0
    times = []
    for i in range(job["steps"]):
        t0 = time.perf_counter()
        session.step(batches[1 - i % 2])
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    cfg = {"model_type": model_type, **find_family(model_type).presets[preset], "vocab_size": vocab}
    return {**job, "batch": batch, "seq": seq, "first_step_s": round(first, 2), "step_s": round(step, 3),
            "step_times": [round(t, 3) for t in times], "tokens_per_s": round(batch * seq / step, 1),
            "compile_s": round(first - step, 1) if job["compile"] else None,
            "compile_timers_s": round(STATS.seconds, 1) if job["compile"] else None,
            "graphs": STATS.graphs if job["compile"] else None,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "flops_per_token": families.train_flops_per_token(cfg, "lora-qv", seq),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES)[:3], choices=list(SHAPES))
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16-true"])
    ap.add_argument("--quantize", default="none", choices=["none", "nf4"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="print the table of the results file")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.render:
        from report_compile import compile_table

        print(compile_table(json.loads(OUT.read_text())))
        return
    result = json.loads(OUT.read_text()) if OUT.is_file() else {"format": "compile", "rows": []}
    result["machine"] = {**common.machine(), "matmul": families.matmul_rate(), "amx": families.cpu_flags()}
    command = "python benchmarks/bench_compile.py " + " ".join(sys.argv[1:])
    for shape in args.shapes:
        for precision in args.precisions:
            for compiled in (False, True):
                job = dict(shape=shape, precision=precision, quantize=args.quantize, compile=compiled,
                           steps=args.steps, threads=args.threads)
                row = common.in_subprocess(__file__, job, timeout=1800)
                row["command"] = command
                print(json.dumps(row), flush=True)
                key = (shape, precision, args.quantize, compiled)
                result["rows"] = [r for r in result["rows"]
                                  if (r["shape"], r["precision"], r["quantize"], r["compile"]) != key] + [row]
    result["rows"].sort(key=lambda r: (list(SHAPES).index(r["shape"]), r["quantize"], r["precision"], r["compile"]))
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
