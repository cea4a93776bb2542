"""Where one training step's time goes: torch.profiler over a few steps of one benchmark job.

    python benchmarks/profile_step.py --side loratune --case lora-qv --precision bf16-true --seq 128
    python benchmarks/profile_step.py --side peft --device cuda ...

Builds the job exactly as benchmarks/bench_train.py does (same checkpoint, same data; loratune's
side through its Recipe, ``setup_model`` and its ``TrainingSession``, the step ``loratune train``
runs), runs warm-up steps, then profiles ``--steps`` steps and prints the
operators by self time (CPU, and CUDA where present) with the wall time per step.
"""

from __future__ import annotations

import argparse
import time

import torch

import bench_train as bench
import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=("loratune", "peft"), default="loratune")
    ap.add_argument("--case", choices=bench.CASES, default="lora-qv")
    ap.add_argument("--precision", choices=("fp32", "bf16-mixed", "bf16-true"), default="bf16-true")
    ap.add_argument("--size", choices=sorted(bench.SIZES), default="124m")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()

    ckpt = common.make_checkpoint(args.size, common.bench_cache())
    device = torch.device(args.device)
    spec = dict(side=args.side, case=args.case, precision=args.precision, seq=args.seq, batch=args.batch,
                warmup=args.warmup, steps=args.steps, r=4, alpha=32, lr=args.lr, ckpt=str(ckpt))
    _, batches, step = bench.prepare_job(spec, device)
    print(f"optimizer: {type(step.optimizer).__name__}")
    for blk in batches[:args.warmup]:
        step(blk)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for blk in batches[args.warmup:]:
            step(blk)
    wall = (time.perf_counter() - t0) / args.steps
    print(f"{args.side} {args.case} {args.precision} {args.size} seq {args.seq} batch {args.batch} on {device}: "
          f"{wall * 1e3:.1f} ms per profiled step ({args.batch * args.seq / wall:.0f} tok/s under the profiler)")
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=50))
        busy = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
        print(f"GPU busy per step: {busy:.1f} ms of {wall * 1e3:.1f} ms wall")


if __name__ == "__main__":
    main()
