"""Renderers for the memory benchmarks' results (bench_nf4.py, bench_checkpointing.py, bench_qlora.py,
bench_gguf_keep.py): standard library only, so report_tables.py carries them and docs/benchmarks.md's blocks
come from one place."""

from __future__ import annotations

MIB = 2 ** 20
GIB = 2 ** 30


def nf4_table(result: dict) -> str:
    """bench_nf4.py's results: one row per (weight shape, implementation). Standard library only, so
    report_tables.py can carry it (``render``: ``if result.get("format") == "nf4": return nf4_table(result)``)."""
    m = result.get("machine") or {}
    mm = m.get("matmul") or {}
    v = result.get("versions") or {}
    clock = ("process CPU time of one thread (`--threads 1 --clock cpu`)" if result.get("clock") == "cpu"
             else "wall-clock time")
    head = (f"Machine (from the JSON): {m.get('cpu')}, {m.get('cores')} cores; torch {v.get('torch')}, bitsandbytes "
            f"{v.get('bitsandbytes')}, torchao {v.get('torchao')}; fp32 matmul {mm.get('fp32_gflops', 0):,.0f} "
            f"GFLOP/s ({mm.get('shape')}, {mm.get('threads')} thread(s)). Times: {clock}, median of the runs. "
            f"Linear: forward + input-gradient backward on {result.get('tokens')} fp32 tokens; block 64, double "
            f"quantization; random N(0, 0.02) weights. `{result.get('command')}`")
    out = [head, "", "| weight (out x in) | implementation | quantize (ms) | dequantize (ms) | linear fwd+bwd (ms) | "
           "share of the fp32 matmul rate | bits / param | relative RMS error | "
           "max \\|difference\\| from bitsandbytes' weight | runs |", "|" + "---|" * 10]

    def num(row, key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "—"

    for r in result.get("rows") or []:
        impl = r["impl"] + (" (= bitsandbytes, bit for bit)" if r.get("same_as_bitsandbytes") else "")
        if r.get("error"):
            cells = ["refused: " + " ".join(str(r["error"]).split()).replace("|", "\\|")] + ["—"] * 6
        else:
            share = f"{100 * r['matmul_share']:.0f}%" if r.get("matmul_share") else "—"
            cells = [num(r, "quantize_ms", ".1f"), num(r, "dequantize_ms", ".1f"), num(r, "linear_ms", ".1f"), share,
                     num(r, "bits_per_param", ".3f"), num(r, "rel_rms_error", ".4f"),
                     num(r, "max_abs_diff_vs_bitsandbytes", ".2e")]
        runs = "1 (single run)" if r.get("runs") == 1 else f"{r.get('runs')} (median)" if r.get("runs") else "0"
        out.append(f"| {r['shape']} ({r['out']} x {r['in']}) | {impl} | " + " | ".join(cells) + f" | {runs} |")
    return "\n".join(out)


def checkpointing_table(result: dict) -> str:
    """Markdown: the machine, then one row per model, precision and setting."""
    m = result["machine"]
    rate = m.get("matmul") or {}
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; matmul {rate.get('fp32_gflops', 0):.0f} "
           f"GFLOP/s fp32, {rate.get('bf16_gflops', 0):.0f} bf16 (one thread, CPU clock). Batch 1 x seq "
           f"{result['args']['seq']}, LoRA q,v r=4, {result['args']['threads']} thread(s); `{result['command']}`.", "",
           "| model | precision | checkpointing | RSS before the step (MiB) | ru_maxrss (MiB) | step peak: VmHWM - "
           "before (MiB) | guard estimate: total - weights (MiB) | step time CPU s (wall s) | on / off: step peak, "
           "CPU time | runs |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['peak_ratio']:.2f}x, {r['time_ratio']:.2f}x" if "peak_ratio" in r else ""
        out.append(f"| {r['model']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | "
                   f"{r['rss_before'] / MIB:,.0f} | {r['ru_maxrss'] / MIB:,.0f} | {r['step_peak'] / MIB:,.0f} | "
                   f"{r['estimate_step'] / MIB:,.0f} | {r['cpu_s']:.2f} ({r['wall_s']:.2f}) | {ratio} | {r['runs']} |")
    return "\n".join(out)


def qlora_table(result: dict) -> str:
    """bench_qlora.py's results: one row per (precision, case, side), ratios to the peer's plain LoRA."""
    m, mm, model = result["machine"], result["machine"].get("matmul") or {}, result["model"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, AMX bf16: {'yes' if m.get('amx_bf16') else 'no'}; matmul "
           f"{mm.get('fp32_gflops', 0):.0f} GFLOP/s fp32, {mm.get('bf16_gflops', 0):.0f} bf16. Llama-3.2-1B shape "
           f"(random weights, bf16 checkpoint), LoRA {model['targets']} r={model['r']}, batch {model['batch']} x seq "
           f"{model['seq']}; each row one job in a fresh process (single run). `{result['command']}`", "",
           "| precision | case | side | step peak (GiB) | / peer's plain LoRA | setup peak: loading, quantizing (GiB) | "
           "tokens/s | share of the matmul rate | runs |", "|---|---|---|---|---|---|---|---|---|"]
    peer = {r["precision"]: r.get("step_peak") for r in result["rows"]
            if r["case"] == "lora" and r["side"] != "loratune" and r.get("step_peak")}
    flops = result.get("flops_per_token") or 0
    for r in result["rows"]:
        if not r.get("step_peak"):
            out.append(f"| {r['precision']} | {r['case']} | {r['side']} | failed: "
                       f"{str(r.get('error')).replace('|', '/')[:120]} | | | | | {r.get('runs', 1)} |")
            continue
        ratio = f"{r['step_peak'] / peer[r['precision']]:.2f}x" if peer.get(r["precision"]) else "—"
        rate = mm.get("fp32_gflops" if r["precision"] == "fp32" else "bf16_gflops")
        share = f"{100 * r['tokens_per_s'] * flops / (rate * 1e9):.0f}%" if rate and flops else "—"
        setup = f"{r['setup_peak'] / GIB:.2f}" if r.get("setup_peak") else "not recorded"
        out.append(f"| {r['precision']} | {r['case']} | {r['side']} | {r['step_peak'] / GIB:.2f} | {ratio} | "
                   f"{setup} | {r['tokens_per_s']:.1f} | {share} | "
                   f"{'1 (single run)' if r.get('runs', 1) == 1 else r['runs']} |")
    return "\n".join(out)


def gguf_keep_table(result: dict) -> str:
    """bench_gguf_keep.py's results: one row per base storage (fp32, nf4, gguf), ratios to the fp32 row."""
    m, mm, model = result["machine"], result["machine"].get("matmul") or {}, result["model"]
    threads = next((r["threads"] for r in result["rows"] if r.get("threads")), "?")
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m.get('torch')}; matmul {mm.get('fp32_gflops', 0):.0f} "
           f"GFLOP/s fp32 ({mm.get('shape')}). {model['file']} (real weights), LoRA {model['targets']} r={model['r']}, "
           f"fp32, batch {model['batch']} x seq {model['seq']}, {threads} torch thread(s) per job; each row one job "
           f"in a fresh process (single run). "
           f"`{result['command']}`", "",
           "| base | frozen base (MiB) | projections (MiB) | bits / projection weight | step peak (MiB) | / fp32 | "
           "setup peak (MiB) | s / step | / fp32 | tokens/s | share of the fp32 matmul rate | decode every projection "
           "once (s) | first-step loss | runs |", "|" + "---|" * 14]
    fp32 = next((r for r in result["rows"] if r["case"] == "fp32" and r.get("step_peak")), None)
    for r in result["rows"]:
        if not r.get("step_peak"):
            out.append(f"| {r['case']} | failed: {str(r.get('error')).replace('|', '/')[:120]} |" + " |" * 12)
            continue
        bits = f"{8 * r['projection_bytes'] / (fp32['projection_bytes'] / 4):.3f}" if fp32 else "—"
        peak = f"{r['step_peak'] / fp32['step_peak']:.2f}x" if fp32 else "—"
        step = f"{r['median_step_s'] / fp32['median_step_s']:.2f}x" if fp32 else "—"
        share = f"{100 * r['matmul_share']:.0f}%" if r.get("matmul_share") else "—"
        decode = f"{r['decode_all_s']:.2f}" if r.get("decode_all_s") is not None else "—"
        out.append(f"| {r['case']} | {r['base_bytes'] / MIB:,.0f} | {r['projection_bytes'] / MIB:,.0f} | {bits} | "
                   f"{r['step_peak'] / MIB:,.0f} | {peak} | {r['setup_peak'] / MIB:,.0f} | {r['median_step_s']:.2f} | "
                   f"{step} | {r['tokens_per_s']:.1f} | {share} | {decode} | {r['first_loss']:.5f} | "
                   f"{'1 (single run)' if result.get('runs', 1) == 1 else result['runs']} |")
    return "\n".join(out)


def qlora_load_table(result: dict) -> str:
    """bench_qlora_load.py's results: one row per (shape, case), the process's peak against plain LoRA's."""
    cases = {"lora": "LoRA", "qlora": "QLoRA, quantized while loading", "qlora-old": "QLoRA, loaded whole then "
             "quantized (before)"}
    m = result["machine"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores. fp32, LoRA q,v r=4, AdamW; random weights; each row one job in "
           f"a fresh process (single run), peaks are /proc/self/status VmHWM from the process's start (Python and "
           f"torch included: the imports column). `{result['command']}`", "",
           "| shape | checkpoint | batch x seq | case | process peak (GiB) | / LoRA | setup peak (GiB) | guard's setup "
           "estimate (GiB) | estimate / measured | resident after setup (GiB) | imports (GiB) | setup (s) | "
           "s / step | load avg | runs |", "|" + "---|" * 15]
    lora = {r["shape"]: r["process_peak"] for r in result["rows"] if r["case"] == "lora" and r.get("process_peak")}
    for r in result["rows"]:
        head = (f"| {r['shape']} | {r['checkpoint_dtype']} | {r['batch']} x {r['seq']} | "
                f"{cases.get(r['case'], r['case'])} |")
        if not r.get("process_peak"):
            out.append(head + f" failed: {str(r.get('error')).replace('|', '/')[:120]} |" + " |" * 10)
            continue
        ratio = f"{r['process_peak'] / lora[r['shape']]:.2f}x" if lora.get(r["shape"]) else "—"
        steps = ", ".join(f"{t:.1f}" for t in r["step_s"])
        estimate = (f"{r['setup_estimate'] / GIB:.2f} | {r['setup_estimate'] / r['setup_peak']:.2f}"
                    if r["case"] != "qlora-old" else "— (estimates the new path) | —")
        out.append(head + f" {r['process_peak'] / GIB:.2f} | {ratio} | {r['setup_peak'] / GIB:.2f} | {estimate} | "
                   f"{r['resident_after_setup'] / GIB:.2f} | {r['imports_rss'] / GIB:.2f} | {r['setup_s']:.0f} | "
                   f"{steps} | {r['loadavg']:.1f} | 1 (single run) |")
    return "\n".join(out)


RENDERERS = {"nf4": nf4_table, "checkpointing": checkpointing_table, "qlora": qlora_table,
             "gguf_keep": gguf_keep_table, "qlora_load": qlora_load_table}
"""results JSON "format" -> its renderer."""
