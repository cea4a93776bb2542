"""The docs/benchmarks.md table of serve_load.py's results. Standard library only, so report_tables.py carries it."""

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
    serial = {r["clients"]: r["tokens_per_s"] for r in rows if r["config"] == "mixed adapters, one request at a time"}
    for r in rows:
        base = serial.get(r["clients"])
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base and "one request at a time" not in r["config"] else "—"
        ttft = f"{r['ttft_p50_s']:.2f}" if r.get("ttft_p50_s") is not None else "—"
        out.append(f"| {r['config']} | {r['clients']} | {r['tokens_per_s']:.1f} | {ratio} | {r['p50_s']:.2f} | "
                   f"{r['p99_s']:.2f} | {ttft} |")
    return "\n".join(out)


def soak_table(result: dict) -> str:
    """serve_soak.py's outcomes, one row each, then the memory and the state the server was left in."""
    m, job = result.get("machine") or {}, result.get("job") or {}
    mem, final = result.get("memory") or {}, result.get("final_metrics") or {}
    head = (f"Machine (from the JSON): {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}. Job: "
            f"{job.get('model')}, {job.get('clients')} clients for {job.get('seconds', 0):.0f} s, "
            f"{job.get('adapters')} adapters with {job.get('max_adapters')} places, --max-batch "
            f"{job.get('max_batch')}, prompts of {min(job.get('prompt_tokens') or [0])}-"
            f"{max(job.get('prompt_tokens') or [0])} tokens, {job.get('max_tokens')} greedy tokens each; one run.")
    out = [head, "", "| outcome | count |", "|---|---|"]
    out += [f"| {r['outcome']} | {r['count']:,} |" for r in result.get("rows") or []]
    slots = f"{final.get('loratune_kv_slots_free', 0):.0f} of {final.get('loratune_kv_slots', 0):.0f}"
    out += ["", f"{result.get('tokens', 0):,} tokens checked in {result.get('wall_s', 0):.0f} s. Server memory "
            f"(VmRSS, {mem.get('samples')} samples every 5 s; medians of the first and last fifth after the first "
            f"minute): {mem.get('rss_first_mb', 0):,.0f} MB, then {mem.get('rss_last_mb', 0):,.0f} MB "
            f"({mem.get('rss_growth_mb', 0):+,.1f} MB), {mem.get('rss_max_mb', 0):,.0f} MB at most. Afterwards: "
            f"alive {'yes' if result.get('alive_at_end') else 'NO'}, {slots} KV slots free, "
            f"{final.get('loratune_streams_open', 0):.0f} streams open; SIGTERM ended it with status "
            f"{result.get('sigterm_exit')}."]
    return "\n".join(out)
