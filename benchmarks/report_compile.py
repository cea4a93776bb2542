"""The table of benchmarks/results/compile.json (benchmarks/bench_compile.py): compiled blocks against eager."""

from __future__ import annotations

MIB = 2**20


def compile_table(result: dict) -> str:
    """Markdown: the machine, then per shape, precision and base one eager and one compiled row; the compiled
    row carries the ratios to eager and the compile time."""
    m, rate = result["machine"], result["machine"].get("matmul") or {}
    commands = sorted({r.get("command", "") for r in result["rows"]})
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, matrix units: "
           f"{', '.join(m.get('amx') or []) or 'none'}; matmul {rate.get('fp32_gflops', 0):.0f} GFLOP/s fp32, "
           f"{rate.get('bf16_gflops', 0):.1f} bf16. LoRA q,v r=4, random weights; each row one job in a fresh "
           f"process, the median of its timed steps after one warm-up step (the compiled job's warm-up step is the "
           f"one that compiles); single runs. " + "; ".join(f"`{c}`" for c in commands if c), "",
           "| shape | batch x seq | precision | base | blocks | tokens/s | share of the matmul rate | "
           "ru_maxrss (MiB) | compiled / eager: tokens/s, RSS | compile time: first step - steady step (dynamo + "
           "inductor timers) | graphs | load average |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    eager = {(r["shape"], r["precision"], r["quantize"]): r for r in result["rows"] if not r["compile"]}
    for r in result["rows"]:
        if "error" in r:
            out.append(f"| {r['shape']} | | {r['precision']} | {r['quantize']} | "
                       f"{'compiled' if r['compile'] else 'eager'} | error: {r['error']} | | | | | | |")
            continue
        gflops = rate.get("fp32_gflops" if r["precision"] == "fp32" else "bf16_gflops")
        share = f"{r['tokens_per_s'] * r['flops_per_token'] / (gflops * 1e9):.0%}" if gflops else ""
        base = eager.get((r["shape"], r["precision"], r["quantize"]))
        ratio = compile_s = graphs = ""
        if r["compile"]:
            if base and "error" not in base:
                ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x, {r['ru_maxrss'] / base['ru_maxrss']:.2f}x"
            compile_s = f"{r['compile_s']:.0f} s ({r['compile_timers_s']:.0f} s)"
            graphs = str(r["graphs"])
        out.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['precision']} | "
                   f"{'plain' if r['quantize'] == 'none' else r['quantize']} | "
                   f"{'compiled' if r['compile'] else 'eager'} | {r['tokens_per_s']:,.0f} | {share} | "
                   f"{r['ru_maxrss'] / MIB:,.0f} | {ratio} | {compile_s} | {graphs} | {r['loadavg'][0]:.1f} |")
    return "\n".join(out)
