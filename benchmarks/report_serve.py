"""The README table of serve_load.py's results. Standard library only, so report_tables.py carries it."""

from __future__ import annotations


def serve_table(result: dict) -> str:
    m, job = result.get("machine") or {}, result.get("job") or {}
    mm = m.get("matmul") or {}
    head = (f"Machine (from the JSON): {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}; fp32 matmul "
            f"{mm.get('fp32_gflops', 0):,.0f} GFLOP/s ({mm.get('shape')}, {mm.get('threads')} threads). Job: "
            f"{job.get('model')}, {job.get('adapters')} adapters ({job.get('adapter')}), {job.get('requests')} "
            f"requests of {job.get('prompt_tokens')} prompt tokens and {job.get('max_tokens')} new ones, greedy, "
            "streamed over loopback HTTP; every row is a single run.")
    out = [head, "", "| configuration | clients | tokens/s | vs one at a time (same clients) | p50 latency (s) | "
           "p99 latency (s) | p50 time to first token (s) |", "|" + "---|" * 7]
    rows = result.get("rows") or []
    serial = {r["clients"]: r["tokens_per_s"] for r in rows if r["config"].endswith("one request at a time")}
    for r in rows:
        base = serial.get(r["clients"])
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base and "one request at a time" not in r["config"] else "—"
        ttft = f"{r['ttft_p50_s']:.2f}" if r.get("ttft_p50_s") is not None else "—"
        out.append(f"| {r['config']} | {r['clients']} | {r['tokens_per_s']:.1f} | {ratio} | {r['p50_s']:.2f} | "
                   f"{r['p99_s']:.2f} | {ttft} |")
    return "\n".join(out)
