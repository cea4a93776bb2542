"""The docs/benchmarks.md table of bench_dist.py's results (one process against torchrun's N, and the scaling on paper).
Standard library only, so report_tables.py carries it."""

from __future__ import annotations


def dist_table(result: dict) -> str:
    m, job = result.get("machine") or {}, result.get("job") or {}
    mm = m.get("matmul") or {}
    rate = mm.get("fp32_gflops")
    flops = job.get("flops_per_token")
    head = (f"Machine (from the JSON): {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}; fp32 matmul "
            f"{rate or 0:,.0f} GFLOP/s ({mm.get('shape')}, {mm.get('threads')} threads). Job: {job.get('model')}, "
            f"LoRA {job.get('lora')}, batch {job.get('batch')} x {job.get('seq')} tokens, {job.get('precision')}, "
            f"{job.get('steps')} steps, the median step after the first two; every row is a single run.")
    out = [head, "", "| processes | strategy | threads each | step (s) | tokens/s | vs one process | "
           "share of the fp32 matmul rate |", "|" + "---|" * 7]
    runs = result.get("rows") or []
    base = runs[0].get("step_s") if runs else None
    for r in runs:
        if "error" in r:
            out.append(f"| {r['nproc']} | {r['strategy']} | — | failed: {r['error'][:80]} | — | — | — |")
            continue
        share = f"{r['tokens_per_s'] * flops / (rate * 1e9):.1%}" if rate and flops else "—"
        speed = f"{base / r['step_s']:.2f}x" if base else "—"
        out.append(f"| {r['nproc']} | {r['strategy']} | {r['threads_per_process']} | {r['step_s']:.2f} | "
                   f"{r['tokens_per_s']:,.0f} | {speed} | {share} |")
    ar = result.get("allreduce") or {}
    if ar.get("median_s"):
        out += ["", f"The adapter's gradient is {ar['numel']:,} floats ({ar['bytes'] / 1e6:.2f} MB); its all-reduce "
                f"over {ar['nproc']} processes (gloo, loopback) took {ar['median_s'] * 1e3:.2f} ms (median of 50), "
                f"a bus bandwidth of {ar['bus_bytes_per_s'] / 1e9:.2f} GB/s."]
    scaling = result.get("scaling") or []
    if scaling:
        predicted = "; ".join(f"{s['n']} devices: {s['step_s']:.3f} s per step, of which {s['allreduce_s'] * 1e3:.2f} "
                              f"ms all-reduce, {s['speedup']:.2f}x" for s in scaling)
        out += ["", "On paper, for N devices each as fast as this whole machine (the one-process step T1 / N + the "
                "ring all-reduce of that gradient at the measured bandwidth; a smaller batch per device running "
                f"less efficiently is left out): {predicted}."]
    return "\n".join(out)
