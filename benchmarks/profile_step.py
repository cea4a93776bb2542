"""Where one training step's time goes: torch.profiler over a few steps of one benchmark job.

    python benchmarks/profile_step.py --side loratune --case lora-qv --precision bf16-true --seq 128
    python benchmarks/profile_step.py --side peft --device cuda ...
    python benchmarks/profile_step.py --size smollm2-135m --precision fp32 --seq 2048 --batch 1 --threads 1
    python benchmarks/profile_step.py --attention --seqs 512,2048 --threads 1   # the attention kernels alone

Builds the job exactly as benchmarks/bench_train.py does (same checkpoint, same data; loratune's
side through its Recipe, ``setup_model`` and its ``TrainingSession``, the step ``loratune train``
runs), runs warm-up steps, then profiles ``--steps`` steps and prints the operators by self time
(CPU, and CUDA where present) with the wall time per step, then the same time summed into
kinds of work (:data:`KINDS`: matrix products, attention kernels, softmax, elementwise,
copies, ...), with each kind's share of the step.

``--attention`` instead times causal attention alone, forward + backward, at the Llama-style
shapes (``bench_families.FAMILY_SIZES``) for each sequence length and precision:
SDPA (its CPU flash kernel, grouped-query heads via ``enable_gqa`` or copied by
``repeat_interleave``), the two-matmul path (``causal_matmul_attention``) and the tiled path
(``tiled_attention``, per block size). Times are CPU seconds of this process (median of
``--repeats``), and each path's FLOPs rate is shown against the matmul rate
(``bench_families.matmul_rate``): this is how ``loratune/models/attention.py`` picks its path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_families as families
import bench_train as bench
import common
import torch

KINDS = (
    ("attention kernel", ("_scaled_dot_product_flash_attention", "flash_attention")),
    ("matrix products", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
                         "aten::linear", "mkldnn")),
    ("softmax", ("softmax",)),
    ("loss (log-softmax, cross-entropy)", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("copies and casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
                          "aten::cat", "aten::index", "aten::repeat", "aten::expand", "aten::fill_", "aten::zero_",
                          "aten::zeros", "aten::empty", "aten::masked_fill")),
    ("optimizer", ("adam", "Optimizer", "_foreach", "clip_grad", "norm")),
    ("elementwise (rope, norms, activations, LoRA adds)", ("aten::mul", "aten::add", "aten::sub", "aten::div",
                                                           "aten::neg", "aten::silu", "aten::rsqrt", "aten::pow",
                                                           "aten::mean", "aten::sum", "aten::exp", "aten::tanh",
                                                           "aten::gelu", "aten::where", "backward")),
)
"""Kinds of work, each a tuple of substrings of profiler operator names (first match wins)."""


def kind_of(name: str) -> str:
    """The :data:`KINDS` entry an operator's time counts under ("other" where none matches)."""
    for kind, needles in KINDS:
        if any(n in name for n in needles):
            return kind
    return "other"


def by_kind(events) -> dict[str, float]:
    """Self CPU milliseconds per kind of work, over every profiled operator."""
    out: dict[str, float] = {}
    for e in events:
        out[kind_of(e.key)] = out.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile_job(args: argparse.Namespace) -> None:
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
    t0, c0 = time.perf_counter(), time.process_time()
    with profile(activities=activities) as prof:
        for blk in batches[args.warmup:]:
            step(blk)
    wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    print(f"{args.side} {args.case} {args.precision} {args.size} seq {args.seq} batch {args.batch} on {device}, "
          f"{torch.get_num_threads()} threads: {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU per profiled step "
          f"({args.batch * args.seq / wall:.0f} tok/s wall under the profiler)")
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    kinds = by_kind(events)
    total = sum(kinds.values())
    print("\n| kind of work | ms per step | share of the step's self CPU time |\n|---|---|---|")
    for kind, ms in kinds.items():
        print(f"| {kind} | {ms / args.steps:.0f} | {100 * ms / total:.0f}% |")
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=50))
        busy = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
        print(f"GPU busy per step: {busy:.1f} ms of {wall * 1e3:.1f} ms wall")


def _cpu_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def _attention_paths(q, k, v, hs: int, blocks: list[int]) -> dict:
    """name -> a call of that attention path on (q, k, v), causal."""
    import torch.nn.functional as F

    from loratune.models.attention import causal_matmul_attention
    from loratune.models.tiled_attention import tiled_attention

    rep = q.shape[1] // k.shape[1]
    return {
        "sdpa (flash), enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa (flash), k/v repeat_interleave": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True),
        "two matmuls (T x T probabilities kept)": lambda: causal_matmul_attention(q, k, v, hs ** -0.5),
        **{f"tiled, block {b}": (lambda b=b: tiled_attention(q, k, v, hs ** -0.5, block=b)) for b in blocks},
    }


def attention_paths(args: argparse.Namespace) -> None:
    """Forward + backward of causal attention per path at the family shapes (see the module docstring)."""
    rates = families.matmul_rate(clock="cpu")
    print(f"matmul {rates['shape']}, {rates['threads']} threads: fp32 {rates['fp32_gflops']:.1f} GFLOP/s, "
          f"bf16 {rates['bf16_gflops']:.1f} GFLOP/s")
    print("| shape | seq | batch | precision | path | ms fwd+bwd | share of the matmul rate |\n|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        cfg = families.hf_config(common.make_checkpoint(size, common.bench_cache()))
        nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        hs = cfg.get("head_dim") or cfg["hidden_size"] // nh
        for seq in map(int, args.seqs.split(",")):
            batch = max(1, args.tokens // seq)
            for precision in args.precisions.split(","):
                dtype = torch.float32 if precision == "fp32" else torch.bfloat16
                gen = torch.Generator().manual_seed(0)
                q = torch.randn(batch, nh, seq, hs, generator=gen).to(dtype).requires_grad_()
                k, v = (torch.randn(batch, nkv, seq, hs, generator=gen).to(dtype).requires_grad_() for _ in range(2))
                grad = torch.randn(batch, nh, seq, hs, generator=gen).to(dtype)
                flops = 2 * 2 * batch * nh * seq * seq / 2 * hs * 3.5  # causal: fwd 2 products, bwd 5 (one recomputed)
                paths = _attention_paths(q, k, v, hs, [int(b) for b in args.blocks.split(",")])
                rate = rates["fp32_gflops" if dtype == torch.float32 else "bf16_gflops"]
                for name, fn in paths.items():
                    s = _cpu_seconds(lambda fn=fn, grad=grad: fn().backward(grad), args.repeats)
                    print(f"| {size} | {seq} | {batch} | {precision} | {name} | {s * 1e3:.0f} | "
                          f"{100 * flops / s / 1e9 / rate:.0f}% |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=("loratune", "peft"), default="loratune")
    ap.add_argument("--case", choices=bench.CASES, default="lora-qv")
    ap.add_argument("--precision", choices=("fp32", "bf16-mixed", "bf16-true"), default="bf16-true")
    ap.add_argument("--size", choices=sorted(bench.SIZES) + sorted(families.FAMILY_SIZES), default="124m")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--attention", action="store_true", help="time the attention paths alone (no model step)")
    ap.add_argument("--sizes", default="smollm2-135m,qwen3-0.6b", help="--attention: the family shapes")
    ap.add_argument("--seqs", default="512,2048", help="--attention: sequence lengths")
    ap.add_argument("--tokens", type=int, default=2048, help="--attention: batch = max(1, tokens // seq)")
    ap.add_argument("--precisions", default="fp32", help="--attention: fp32, bf16")
    ap.add_argument("--blocks", default="64,128,256", help="--attention: tiled block sizes")
    ap.add_argument("--repeats", type=int, default=2, help="--attention: timed runs per path (median)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    attention_paths(args) if args.attention else profile_job(args)


if __name__ == "__main__":
    main()
