"""NF4 (QLoRA 4-bit) weights side by side: loratune's own, bitsandbytes on CPU, torchao's NF4Tensor.

For each weight shape -- Llama-3.2-1B's projections (q/o 2048x2048, k/v 512x2048, gate/up
8192x2048, as out x in), GPT-2's fused c_attn (Conv1D (768, 2304): out 2304 x in 768) and
SmolLM2-135M's k_proj (192x576, which torchao refuses: its weights must hold a multiple of
64 x 256 values) -- and each implementation, one row with:

- quantize / dequantize time (ms), the dequantized weight in fp32;
- the frozen NF4 linear's forward + input-gradient backward on ``--tokens`` fp32 tokens (what a
  QLoRA base layer costs per step), its GFLOP/s (4 x tokens x in x out FLOPs: 2 forward, 2 for
  the input gradient; the dequantizations are overhead, not counted) and that rate's share of
  this machine's fp32 matmul rate (``bench_families.matmul_rate``, best of before and after);
- stored bits per parameter (codes + scales + double-quantization state; the fixed 16- and
  256-entry code tables are not counted);
- RMS error of the dequantized weight relative to the fp32 weight's RMS (random N(0, 0.02)
  weights, seed 0: ~0.092 for NF4 at block 64, see tests/quant/test_nf4.py for the analytic value).

Plus one ``fp32 (unquantized)`` row per shape: plain ``F.linear`` forward + input-gradient backward on
the float weight, the floor the NF4 rows pay their dequantization on top of. Every implementation
uses block 64 and double quantization (torchao: its own int8 scheme for the scales). loratune's
rows also record whether its packed bytes, scales and dequantized weight equal bitsandbytes'.

Times are medians of ``--repeats`` runs after one warm-up, by the process CPU time of one thread
(``--threads 1 --clock cpu``, the convention of bench_train.py on this shared 2-core machine;
``--clock wall`` for a quiet one). OMP_NUM_THREADS is set to ``--threads`` so bitsandbytes'
OpenMP kernels run on the same count.

    python benchmarks/bench_nf4.py                   # ~2 min; writes benchmarks/results/nf4.json
    python benchmarks/bench_nf4.py --quick           # two small shapes, 2 repeats

Render the table with ``nf4_table`` below (``benchmarks/report_tables.py`` needs the same function).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import common
import report_memory  # the results table

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama-3.2-1b q_proj/o_proj": (2048, 2048),
    "llama-3.2-1b k_proj/v_proj": (512, 2048),
    "llama-3.2-1b gate_proj/up_proj": (8192, 2048),
    "gpt2 c_attn": (2304, 768),
    "smollm2-135m k_proj/v_proj": (192, 576),
}
"""name -> (out, in) of the linear weight."""
QUICK = ("llama-3.2-1b k_proj/v_proj", "smollm2-135m k_proj/v_proj")
IMPLS = ("loratune", "loratune, unfused (before)", "bitsandbytes", "torchao", "fp32 (unquantized)")
"""``loratune`` multiplies tile by tile as it dequantizes (the default on CPU, loratune/quant/linear.py);
``loratune, unfused (before)`` dequantizes the whole weight, then multiplies (``FUSED_CPU = False``)."""
BF16_IMPLS = ("loratune", "loratune, unfused (before)", "bitsandbytes", "bf16 (unquantized)")
"""Rows for ``--bf16-shapes``: the linear only, on bf16 tokens (bitsandbytes' compute dtype bf16)."""


def timed(fn, repeats: int, clock: str) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    fn()
    times = []
    for _ in range(repeats):
        t0 = timer()
        fn()
        times.append(timer() - t0)
    return 1e3 * statistics.median(times)


def implementation(name: str):
    """(quantize(w) -> q, dequantize(q) -> fp32 (out, in), linear(x, q) -> y, bits(q) -> float) of one side."""
    import torch

    if name.startswith("loratune"):
        from loratune.quant import bits_per_param, dequantize_nf4, linear, nf4_linear, quantize_nf4

        def product(x, q):
            linear.FUSED_CPU = "unfused" not in name
            try:
                return nf4_linear(x, q)
            finally:
                linear.FUSED_CPU = True
        return (quantize_nf4, lambda q: dequantize_nf4(q, torch.float32), product, bits_per_param)
    if name == "bitsandbytes":
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        def bits(q):
            packed, st = q
            stored = [packed, st.absmax, st.state2.absmax, st.offset]
            return sum(t.numel() * t.element_size() for t in stored) * 8 / (st.shape[0] * st.shape[1])
        def product(x, q):
            q[1].dtype = x.dtype  # the compute dtype: dequantize to the input's, as Linear4bit does
            return bnb.matmul_4bit(x, q[0].t(), quant_state=q[1])
        return (lambda w: bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                lambda q: bf.dequantize_4bit(*q), product, bits)
    if name == "torchao":
        from torchao.quantization import to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        def bits(q):
            stored = [q.quantized_data, q.quantized_scalers, q.quantization_factor, q.scaler_mean]
            return sum(t.numel() * t.element_size() for t in stored) * 8 / q.numel()
        return (lambda w: to_nf4(w, 64, 256), lambda q: q.get_original_weight(), linear_nf4, bits)
    import torch.nn.functional as F
    return (lambda w: w, lambda q: q, lambda x, w: F.linear(x, w), lambda q: 32.0)


def measure(impl: str, w, x, reference, args: argparse.Namespace) -> dict:
    """One row's numbers for ``impl`` on weight ``w`` (out, in) and input ``x`` (tokens, in); ``reference``
    is bitsandbytes' dequantized weight (None without it). A bf16 ``x``: the linear's time only."""
    import torch

    if x.dtype == torch.bfloat16:
        _, _, linear, _ = implementation(impl.replace("bf16", "fp32"))
        q = w.bfloat16() if "unquantized" in impl else implementation(impl)[0](w)

        def step():
            xg = x.detach().requires_grad_(True)
            linear(xg, q).sum().backward()
        ms = timed(step, args.repeats, args.clock)
        return {"impl": impl + ", bf16 tokens", "runs": args.repeats, "linear_ms": ms,
                "linear_gflops": 4 * x.shape[0] * w.shape[0] * w.shape[1] / (ms / 1e3) / 1e9}
    quantize, dequantize, linear, bits = implementation(impl)
    row = {"impl": impl, "runs": args.repeats}
    try:
        q = quantize(w)
    except Exception as e:  # torchao asserts on sizes it cannot block
        return {**row, "runs": 0, "error": f"{type(e).__name__}: {str(e).strip()[:160]}"}
    deq = dequantize(q).float()
    row["rel_rms_error"] = float((deq - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    row["bits_per_param"] = float(bits(q))
    if reference is not None and impl != "fp32 (unquantized)":
        row["max_abs_diff_vs_bitsandbytes"] = float((deq - reference).abs().max())

    def step():
        xg = x.detach().requires_grad_(True)
        linear(xg, q).sum().backward()

    if impl != "fp32 (unquantized)":
        row["quantize_ms"] = timed(lambda: quantize(w), args.repeats, args.clock)
        row["dequantize_ms"] = timed(lambda: dequantize(q), args.repeats, args.clock)
    row["linear_ms"] = timed(step, args.repeats, args.clock)
    row["linear_gflops"] = 4 * x.shape[0] * w.shape[0] * w.shape[1] / (row["linear_ms"] / 1e3) / 1e9
    if impl == "loratune":
        row["same_as_bitsandbytes"] = same_as_bnb(q, w)
    return row


def bnb_reference(w):
    """bitsandbytes' dequantized NF4 weight (block 64, double quantization), or None without it."""
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        return None
    return bf.dequantize_4bit(*bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))


def same_as_bnb(q, w) -> bool | None:
    """Whether loratune's bytes, scales and dequantized weight equal bitsandbytes' (None without it)."""
    import torch

    try:
        import bitsandbytes.functional as bf
    except ImportError:
        return None
    from loratune.quant import dequantize_nf4
    packed, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return bool(torch.equal(q.data, packed.flatten()) and torch.equal(q.absmax, st.absmax)
                and torch.equal(q.absmax_scale, st.state2.absmax) and torch.equal(q.absmax_offset, st.offset)
                and torch.equal(dequantize_nf4(q), bf.dequantize_4bit(packed, st)))


def set_shares(result: dict) -> None:
    rates = result["machine"]["matmul"]
    for row in result["rows"]:
        if row.get("linear_gflops"):  # the bf16 rows: against the better of the two rates (the roofline of a
            best = max(rates["fp32_gflops"], rates["bf16_gflops"])  # bf16 product that may run on the fp32 kernel)
            row["matmul_share"] = row["linear_gflops"] / (best if "bf16" in row["impl"] else rates["fp32_gflops"])


def run(args: argparse.Namespace) -> dict:
    import bench_families as families
    import torch

    torch.set_num_threads(args.threads)
    machine = common.machine("cpu")
    machine.update(cpu_flags=families.cpu_flags(), matmul=families.matmul_rate(clock=args.clock))
    versions = {"torch": torch.__version__}
    for pkg in ("bitsandbytes", "torchao"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = None
    result = {"format": "nf4", "machine": machine, "command": ("python benchmarks/bench_nf4.py " + shlex.join(
        sys.argv[1:])).strip(), "args": vars(args), "clock": args.clock, "threads": args.threads, "tokens": args.tokens,
        "versions": versions, "loadavg_start": os.getloadavg(), "rows": []}
    for name in (QUICK if args.quick else SHAPES):
        out_f, in_f = SHAPES[name]
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        x = torch.randn(args.tokens, in_f, generator=gen)
        reference = bnb_reference(w)
        for impl in IMPLS:
            if impl != "fp32 (unquantized)" and versions.get(impl, True) is None:
                row = {"impl": impl, "runs": 0, "error": f"{impl} is not installed"}
            else:
                row = measure(impl, w, x, reference, args)
            result["rows"].append({"shape": name, "out": out_f, "in": in_f, **row})
            print(f"  {name} {impl}: {json.dumps(result['rows'][-1])}", file=sys.stderr, flush=True)
        for impl in BF16_IMPLS if name in args.bf16_shapes.split(",") else ():
            row = measure(impl, w, x.bfloat16(), None, args)
            result["rows"].append({"shape": name, "out": out_f, "in": in_f, **row})
            print(f"  {name} {row['impl']}: {json.dumps(row)}", file=sys.stderr, flush=True)
    runs = [machine["matmul"], families.matmul_rate(clock=args.clock)]
    machine["matmul"] = {**runs[0], **{k: max(r[k] for r in runs) for k in ("fp32_gflops", "bf16_gflops")}}
    machine["matmul_runs"] = runs
    result["loadavg_end"] = os.getloadavg()
    set_shares(result)
    return result


# --------------------------------------------------------------------------- the table
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median), after a warm-up")
    ap.add_argument("--tokens", type=int, default=512, help="rows of the linear's input")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, 2 repeats")
    ap.add_argument("--bf16-shapes", default="llama-3.2-1b k_proj/v_proj",
                    help="','-separated shape names whose linear also runs on bf16 tokens (bf16 rows: '' for none); "
                    "on a CPU without native bf16 its g @ W product is slow, so the default is one small shape")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/nf4.json; "
                    "--quick writes none unless given)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch and bitsandbytes load their OpenMP
    result = run(args)
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / "nf4.json")
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(report_memory.nf4_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
