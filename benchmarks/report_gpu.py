"""The docs/benchmarks.md tables of benchmarks/gpu_run.py's results (``format: gpu_run``), and the run's summary
against the goals. Standard library only, so report_tables.py carries it."""

from __future__ import annotations

GIB = 2 ** 30
PEER = {"train": "transformers+peft", "generate": "transformers", "serve": "transformers+PEFT"}


def _rows(result: dict, section: str) -> list[dict]:
    return ((result.get("sections") or {}).get(section) or {}).get("rows") or []


def _ok(row: dict | None) -> bool:
    return bool(row) and not row.get("skipped") and not row.get("error") and bool(row.get("tokens_per_s"))


def _why(row: dict | None) -> str:
    if row is None:
        return "missing"
    text = row.get("skipped") or ("error: " + row["error"] if row.get("error") else "")
    return " ".join(str(text).split()).replace("|", "\\|")


def _mem(row: dict, key: str = "peak", kind: str = "allocated") -> float | None:
    value = (row.get(key) or {}).get(kind)
    return value / GIB if value is not None else None


def _gib(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "—"


def _pair(rows: list[dict], row: dict, keys: tuple[str, ...], peer: str) -> dict | None:
    return next((r for r in rows if r.get("side") == peer and all(r.get(k) == row.get(k) for k in keys)), None)


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return a["tokens_per_s"] / b["tokens_per_s"] if _ok(a) and _ok(b) else None


def _mem_ratio(a: dict | None, b: dict | None) -> float | None:
    ma, mb = (_mem(r) if _ok(r) else None for r in (a, b))
    return ma / mb if ma and mb else None


TRAIN_KEYS = ("shape", "case", "compile", "seq", "batch")


def _train_rows(result: dict) -> list[dict]:
    return _rows(result, "train") + _rows(result, "train_compile")


# --------------------------------------------------------------------------- tables
def gpu_run_table(result: dict) -> str:
    """The run's machine line, one table per section (every row, skipped ones with their reason), the summary."""
    m = result.get("machine") or {}
    mm = m.get("matmul") or {}
    head = (f"Device (from the JSON): {result.get('device')}{' — DRY RUN on the CPU, tiny shapes' if result.get('dry_run') else ''}; "
            f"torch {m.get('torch')} (CUDA {m.get('cuda')}), transformers {m.get('transformers')}, PEFT {m.get('peft')}, "
            f"bitsandbytes {m.get('bitsandbytes')}; measured bf16 matmul {mm.get('bf16_tflops', 0):,.3g} TFLOP/s "
            f"({mm.get('shape')}), the roofline. `{result.get('command')}`, {result.get('wall_s', 0):.0f} s in all. "
            "Every row is a single run.")
    out = [head]
    for sections, render in ((("parity",), parity_table), (("train", "train_compile"), train_table),
                             (("generate",), gen_table), (("serve",), serve_table), (("gpt2_checks",), checks_table)):
        secs = [(n, (result.get("sections") or {}).get(n)) for n in sections]
        if any(sec and sec.get("rows") for _, sec in secs):
            out += [""] + render(result)
        for name, sec in secs:
            if not sec or sec.get("skipped"):
                out += ["", f"Section {name}: {'skipped: ' + _why(sec) if sec else 'not run'}."]
    out += ["", "Summary against the goals (>= 1.5x the peer's tokens/s, <= 0.5x its peak memory):", ""]
    out += [f"- {line}" for line in summary_lines(result)]
    return "\n".join(out)


def parity_table(result: dict) -> list[str]:
    out = [("| family | fp32 relative L2 | fp32 max diff / max | bf16 vs transformers bf16: relative L2, max | "
           "bf16 vs the fp32 reference, ours: L2, max | the same, transformers' bf16 | within the limits |"),
           "|" + "---|" * 7]
    first = None
    for r in _rows(result, "parity"):
        if r.get("skipped") or r.get("error"):
            out.append(f"| {r.get('family')} | {_why(r)} | | | | | — |")
            continue
        first = first or r
        f, b = r["fp32"], r["bf16"]
        out.append(f"| {r['family']} | {f['rel_l2']:.1e} | {f['rel_max']:.1e} | {b['rel_l2']:.1e}, {b['rel_max']:.1e} | "
                   f"{b['ours_vs_fp32_l2']:.1e}, {b['ours_vs_fp32_max']:.1e} | {b['hf_vs_fp32_l2']:.1e}, "
                   f"{b['hf_vs_fp32_max']:.1e} | {'yes' if r.get('ok') else '**no**'} |")
    if first:
        (l2, mx), k = first["fp32_limits"], first["bf16_factor"]
        out += ["", (f"Limits: fp32 relative L2 <= {l2:.0e} and max difference / max reference <= {mx:.0e} (TF32 off); "
                    f"bf16: ours at most {k}x as far from the fp32 reference as transformers' bf16 (+ 1e-3), both "
                    "measures. Both sides on the device, the same saved tiny checkpoint (large weights), (2, 64) ids.")]
    return out


def train_table(result: dict) -> list[str]:
    rows = _train_rows(result)
    mem = "peak RSS of the process (GiB)" if result.get("dry_run") else "peak allocated / reserved (GiB)"
    out = [(f"| shape, case, compile, seq x batch | side | tokens/s | vs the peer | {mem} | steps' peak allocated (GiB) | "
           "memory vs the peer | roofline share | compile (s) | loss first -> last |"), "|" + "---|" * 10]
    for r in rows:
        job = f"{r.get('shape')}, {r.get('case')}, {'compiled' if r.get('compile') else 'eager'}, {r.get('seq')} x {r.get('batch')}"
        if not _ok(r):
            out.append(f"| {job} | {r.get('side')} | {_why(r)} | | | | | | | |")
            continue
        peer = _pair(rows, r, TRAIN_KEYS, PEER["train"]) if r["side"] == "loratune" else None
        q, mq = _ratio(r, peer), _mem_ratio(r, peer)
        peak = _gib(_mem(r, kind="rss")) if result.get("dry_run") else f"{_gib(_mem(r))} / {_gib(_mem(r, kind='reserved'))}"
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "—"
        out.append(f"| {job} | {r['side']} | {r['tokens_per_s']:,.0f} | {f'{q:.2f}x' if q else '—'} | {peak} | "
                   f"{_gib(_mem(r, 'step_peak'))} | {f'{mq:.2f}' if mq else '—'} | {100 * r['roofline_share']:.1f}% | "
                   f"{comp} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    return out


def gen_table(result: dict) -> list[str]:
    rows = _rows(result, "generate")
    out = [("| shape, batch, prompt + new tokens | side | tokens/s | vs the peer | peak allocated (GiB) | "
           "first 8 tokens agree |"), "|" + "---|" * 6]
    for r in rows:
        job = f"{r.get('shape')}, batch {r.get('batch')}, {r.get('prompt')} + {r.get('new')}"
        if not _ok(r):
            out.append(f"| {job} | {r.get('side')} | {_why(r)} | | | |")
            continue
        peer = _pair(rows, r, ("shape", "batch"), PEER["generate"]) if r["side"] == "loratune" else None
        q = _ratio(r, peer)
        agree = ("yes" if r["first_tokens"] == peer["first_tokens"] else "no") if _ok(peer) else "—"
        out.append(f"| {job} | {r['side']} | {r['tokens_per_s']:,.0f} | {f'{q:.2f}x' if q else '—'} | "
                   f"{_gib(_mem(r))} | {agree} |")
    return out


def serve_table(result: dict) -> list[str]:
    rows = _rows(result, "serve")
    out = [("| configuration | clients | requests x max tokens | tokens/s | vs the peer | p50 latency (s) | "
           "p99 latency (s) | p50 time to first token (s) |"), "|" + "---|" * 8]
    peer = next((r for r in rows if r.get("side") == PEER["serve"]), None)
    for r in rows:
        if not _ok(r):
            out.append(f"| {r.get('side', 'loratune serve')} | {r.get('clients', '—')} | | {_why(r)} | | | | |")
            continue
        q = _ratio(r, peer) if r.get("side") != PEER["serve"] else None
        ttft = f"{r['ttft_p50_s']:.2f}" if r.get("ttft_p50_s") is not None else "—"
        out.append(f"| {r['config']} | {r['clients']} | {r['requests']} x {r.get('max_tokens')} | {r['tokens_per_s']:,.0f} | "
                   f"{f'{q:.2f}x' if q else '—'} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {ttft} |")
    out += ["", ("No serving framework (vLLM, TGI) is on the machine: the peer is transformers + PEFT in-process, one "
                "request at a time, with no HTTP (an upper bound for a server around it).")]
    return out


def checks_table(result: dict) -> list[str]:
    out = ["| benchmarks/gpu_check.py check | result | detail |", "|---|---|---|"]
    for r in _rows(result, "gpt2_checks"):
        status = "skipped" if r.get("skipped") else r.get("status", "PASS" if r.get("ok") else "FAIL")
        out.append(f"| {r.get('check')} | {status} | {_why(r) or r.get('detail', '').replace('|', '/')} |")
    return out


# --------------------------------------------------------------------------- summary
def _goal(value: float | None, goal: float, above: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= goal if above else value <= goal
    return f"{value:.2f}{'x' if above else ''} ({'met' if met else 'NOT met'})"


def summary_lines(result: dict) -> list[str]:
    """One line per compared pair and per section, against the goals; skipped and failed rows counted."""
    goals = result.get("goals") or {"tokens_per_s_ratio_min": 1.5, "memory_ratio_max": 0.5}
    speed, memory = goals["tokens_per_s_ratio_min"], goals["memory_ratio_max"]
    lines = ["DRY RUN on the CPU with tiny shapes: these numbers check the script, not the GPU goals."] \
        if result.get("dry_run") else []
    parity = _rows(result, "parity")
    done = [r for r in parity if not r.get("skipped") and not r.get("error")]
    if parity:
        bad = [r.get("family") for r in parity if r.get("error") or (r in done and not r.get("ok"))]
        lines.append(f"parity: {sum(bool(r.get('ok')) for r in done)} of {len(parity)} families within the limits"
                     + (f"; failed: {', '.join(map(str, bad))}" if bad else ""))
    rows = _train_rows(result)
    for r in (r for r in rows if r.get("side") == "loratune"):
        peer = _pair(rows, r, TRAIN_KEYS, PEER["train"])
        job = f"train {r.get('shape')} {r.get('case')} {'compiled' if r.get('compile') else 'eager'}"
        if not (_ok(r) and _ok(peer)):
            lines.append(f"{job}: not compared (ours: {_why(r) or 'ok'}; peer: {_why(peer) or 'ok'})")
            continue
        mem = None if result.get("dry_run") else _mem_ratio(r, peer)
        lines.append(f"{job}: tokens/s {_goal(_ratio(r, peer), speed, True)}, peak allocated memory "
                     f"{_goal(mem, memory, False) if not result.get('dry_run') else 'not compared on the CPU'}; "
                     f"roofline share {100 * r['roofline_share']:.1f}% vs {100 * peer['roofline_share']:.1f}%")
    gen = _rows(result, "generate")
    for r in (r for r in gen if r.get("side") == "loratune"):
        peer = _pair(gen, r, ("shape", "batch"), PEER["generate"])
        lines.append(f"generate {r.get('shape')} batch {r.get('batch')}: tokens/s "
                     + (_goal(_ratio(r, peer), 2.0 if r.get("batch") == 1 else speed, True) if _ok(r) and _ok(peer)
                        else f"not compared (ours: {_why(r) or 'ok'}; peer: {_why(peer) or 'ok'})")
                     + (" (goal 2x at batch 1, issue 27 item 5)" if r.get("batch") == 1 else ""))
    srv = _rows(result, "serve")
    ours = next((r for r in srv if r.get("side") == "loratune serve"), None)
    peer = next((r for r in srv if r.get("side") == PEER["serve"]), None)
    if srv and ours is None:
        lines.append(f"serve: not measured ({_why(srv[0])})")
    elif srv:
        lines.append(f"serve, {ours.get('clients')} clients: "
                     + (f"{ours['tokens_per_s']:,.0f} tok/s, {_ratio(ours, peer):.2f}x transformers + PEFT one request "
                        "at a time" if _ok(ours) and _ok(peer) else
                        f"ours: {_why(ours) or 'ok'}; peer: {_why(peer) or 'absent (no serving framework)'}"))
    checks = _rows(result, "gpt2_checks")
    if checks:
        lines.append(f"gpu_check.py: {sum(r.get('status') == 'PASS' for r in checks)} passed, "
                     f"{sum(r.get('status') == 'FAIL' for r in checks)} failed, "
                     f"{sum(bool(r.get('skipped')) for r in checks)} not run")
    skipped = [(n, s) for n, s in (result.get("sections") or {}).items() if s.get("skipped")]
    n_rows = sum(bool(r.get("skipped")) for s in (result.get("sections") or {}).values() for r in s.get("rows") or [])
    n_err = sum(bool(r.get("error")) for s in (result.get("sections") or {}).values() for r in s.get("rows") or [])
    lines.append(f"{len(skipped)} section(s) skipped" + (f" ({', '.join(n for n, _ in skipped)})" if skipped else "")
                 + f", {n_rows} row(s) skipped, {n_err} row(s) failed")
    return lines


def failed_checks(result: dict) -> int:
    """Parity rows outside their limits or failed, plus gpu_check.py's FAIL lines: the run's exit status."""
    parity = sum(1 for r in _rows(result, "parity") if r.get("error") or (not r.get("skipped") and not r.get("ok")))
    return parity + sum(1 for r in _rows(result, "gpt2_checks") if r.get("status") == "FAIL")
