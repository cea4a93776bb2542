"""The tables of benchmarks/results/preference.json (benchmarks/bench_preference.py): DPO steps against TRL's
DPOTrainer with PEFT, and GRPO's rollouts by loratune's engine against transformers' ``generate``."""

from __future__ import annotations

MIB = 2**20


def _side(rows: list[dict], job: str, **match) -> dict | None:
    for r in rows:
        if r.get("job") == job and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ratio(ours: dict | None, peer: dict | None, key: str, invert: bool = False) -> str:
    if not ours or not peer or "error" in ours or "error" in peer:
        return ""
    a, b = ours[key], peer[key]
    return f"{(b / a if invert else a / b):.2f}x"


def preference_table(result: dict) -> str:
    """Markdown: the machine line, one DPO table (ours, TRL, the ratio) and one rollouts table per group size."""
    m, rate = result["machine"], result["machine"].get("matmul") or {}
    gflops = rate.get("fp32_gflops") or 0
    n = result["matmul_params"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, matrix units: "
           f"{', '.join(m.get('amx') or []) or 'none'}; matmul {gflops:.0f} GFLOP/s fp32. Shape {result['shape']} "
           f"(random weights, Llama 2's tokenizer), LoRA r={result['lora']['r']} on q, v, fp32; every row one job in "
           f"a fresh process; single runs. `{result['command']}`", "",
           "| DPO | pairs x seq | s / step | tokens / s (both rows of each pair, no padding) | share of the matmul "
           "rate | ru_maxrss (MiB) | last loss | loratune / TRL: steps/s, RSS |", "|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]  # every job, DPO's and the rollouts' (each names its ``job``)
    ours, peer = _side(rows, "dpo-ours"), _side(rows, "dpo-trl")
    for name, r in (("loratune", ours), ("TRL DPOTrainer + PEFT", peer)):
        if r is None or "error" in r:
            out.append(f"| {name} | | {'missing' if r is None else 'error: ' + r['error']} | | | | | |")
            continue
        tokens = (ours or {}).get("tokens_per_step")  # the same text, tokenizer and cut on both sides
        rate_s = tokens / r["s_per_step"] if tokens else None
        share = f"{rate_s * 6 * n / (gflops * 1e9):.0%}" if rate_s and gflops else ""
        ratio = ""
        if r is ours:
            ratio = f"{_ratio(ours, peer, 's_per_step', invert=True)}, {_ratio(ours, peer, 'ru_maxrss')}"
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else ""
        out.append(f"| {name} | {r['pairs']} x {r['seq']} | {r['s_per_step']:.2f} | "
                   f"{rate_s:,.0f} | {share} | {r['ru_maxrss'] / MIB:,.0f} | {loss} | {ratio} |"
                   if rate_s else f"| {name} | {r['pairs']} x {r['seq']} | {r['s_per_step']:.2f} | | | "
                   f"{r['ru_maxrss'] / MIB:,.0f} | {loss} | {ratio} |")
    out += ["", "| GRPO rollouts | prompts x G x new tokens | s / rollout | new tokens / s | share of the matmul rate "
            "| ru_maxrss (MiB) | loratune / transformers: tokens/s |", "|---|---|---|---|---|---|---|"]
    for g in sorted({r["group"] for r in rows if "group" in r}):
        ours, peer = _side(rows, "rollouts-ours", group=g), _side(rows, "rollouts-peer", group=g)
        for name, r in (("loratune engine", ours), ("transformers generate (PEFT)", peer)):
            if r is None or "error" in r:
                out.append(f"| {name} | G={g} | {'missing' if r is None else 'error: ' + r['error']} | | | | |")
                continue
            share = f"{r['tokens_per_s'] * 2 * n / (gflops * 1e9):.1%}" if gflops else ""
            ratio = _ratio(ours, peer, "tokens_per_s") if r is ours else ""
            out.append(f"| {name} | {r['prompts']} x {g} x {r['new']} | {r['s_per_rollout']:.2f} | "
                       f"{r['tokens_per_s']:,.1f} | {share} | {r['ru_maxrss'] / MIB:,.0f} | {ratio} |")
    return "\n".join(out)
