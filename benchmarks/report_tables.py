"""Markdown tables of a benchmark results file, one row per measured job, for docs/benchmarks.md.

    python benchmarks/report_tables.py benchmarks/results/cpu.json [more.json ...]
    python benchmarks/report_tables.py --markers benchmarks/results/*.json   # blocks to paste

Reads a JSON written by ``benchmarks/bench_train.py`` (``machine``, ``train``, ``generate``, and
either ``runs`` - one entry per command that contributed rows, each with its ``args`` - or a
single top-level ``args``) and prints:

- one line with the machine, from the JSON's ``machine``;
- a training table: every row of ``train``, in the JSON's order;
- a generation table: every row of ``generate``, in the JSON's order (left out when empty);
- one line counting the rows where loratune is slower than the peer.

Files that record FLOPs (``flops_per_token`` per training row and ``machine.matmul``, written by
bench_train.py for every run since the Llama-style families) also get: the machine's measured
matmul rate in the machine line; a column with each side's share of that rate (tokens/s x FLOPs
per token / GFLOP/s in the row's precision: fp32's for fp32, bf16's otherwise); and one line per
(size, seq, case, batch) comparing each side's fastest precision. A row's own ``batch`` wins
over its command's ``--batch``, and generation rows name their model where they record it.

Nothing is dropped: a side that failed or is missing is written as ``failed`` / ``missing`` in
its row. "runs" is the number of successful runs per side: the training rows record it
(``runs``); for generation rows it is their ``runs`` where recorded, else the ``repeats`` of the
command that produced them minus that side's errors. Tokens/s of several runs are their median (the median of 2 is their mean).

With ``--markers`` each file's output is wrapped in ``<!-- table: PATH -->`` ...
``<!-- end table -->``, which is how docs/benchmarks.md (every results file) and README.md (its
headline table) hold them (a run timed by CPU time, ``--clock cpu``, gets a line saying so under
the machine line); ``tests/test_readme_tables.py`` regenerates every such block and checks the
pages against it. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/test_readme_tables.py loads this file by its path
from report_compile import compile_table  # noqa: E402
from report_dist import dist_table  # noqa: E402
from report_gpu import gpu_run_table  # noqa: E402
from report_memory import RENDERERS as MEMORY_RENDERERS  # noqa: E402
from report_preference import preference_table  # noqa: E402
from report_serve import serve_table, soak_table  # noqa: E402

RENDERERS = {**MEMORY_RENDERERS, "dist": dist_table, "serve": serve_table, "soak": soak_table,
             "gpu_run": gpu_run_table, "compile": compile_table, "preference": preference_table}

OURS = "loratune"
PEERS = {"train": "peft", "generate": "transformers"}
PEER_NAMES = {"train": "transformers+PEFT", "generate": "transformers"}
GIB = 2**30


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def count_jobs(result: dict) -> int:
    """Measured jobs in a results file: training rows plus generation rows (or a loading benchmark's rows)."""
    return len(result.get("train") or []) + len(result.get("generate") or []) + len(result.get("rows") or [])


# --------------------------------------------------------------------------- which command made a row
def _commands(result: dict) -> list[dict]:
    """The ``args`` of every command that contributed rows."""
    if isinstance(result.get("runs"), dict):
        return [r.get("args") or {} for r in result["runs"].values()]
    return [result["args"]] if isinstance(result.get("args"), dict) else []


def _items(text) -> list[str]:
    return [x for x in str(text or "").split(",") if x]


def _train_commands(result: dict, row: dict) -> list[dict]:
    return [a for a in _commands(result)
            if row.get("case") in _items(a.get("cases")) and row.get("group") in _items(a.get("precisions"))
            and str(row.get("seq")) in _items(a.get("seqs")) and row.get("size") in _items(a.get("sizes"))]


def _gen_commands(result: dict, row: dict) -> list[dict]:
    return [a for a in _commands(result)
            if str(row.get("batch")) in _items(a.get("gen")) and row.get("precision") in _items(a.get("gen_precisions"))]


def _one(values: list):
    """The value all candidates agree on, else None."""
    values = set(values)
    return values.pop() if len(values) == 1 else None


# --------------------------------------------------------------------------- cells
def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _side(row: dict, key: str) -> dict | None:
    side = row.get(key)
    return side if isinstance(side, dict) else None


def _ok(side: dict | None) -> bool:
    return bool(side) and bool(side.get("tokens_per_s"))


def _missing(side: dict | None) -> str:
    return "missing" if side is None else "failed"


def _tps(side: dict | None) -> str:
    return f"{side['tokens_per_s']:,.0f}" if _ok(side) else _missing(side)


def _ratio(a: dict | None, b: dict | None, key: str, suffix: str = "") -> str:
    if not (a and b and a.get(key) and b.get(key)):
        return "—"
    return f"{a[key] / b[key]:.2f}{suffix}"


def _slower(a: dict | None, b: dict | None) -> bool:
    return _ok(a) and _ok(b) and a["tokens_per_s"] < b["tokens_per_s"]


def _speedup(a: dict | None, b: dict | None) -> str:
    """ours / peer tokens/s; a row where loratune is slower says so (even one that rounds to 1.00x)."""
    return _ratio(a, b, "tokens_per_s", "x") + (" (slower)" if _slower(a, b) else "")


def _mem(side: dict | None) -> str:
    if side is None:
        return "missing"
    if side.get("peak_memory"):
        return f"{side['peak_memory'] / GIB:.2f} GiB"
    return "—" if _ok(side) else "failed"


def _loss(side: dict | None) -> str:
    if side is None:
        return "missing"
    return f"{side['final_loss']:.4f}" if side.get("final_loss") is not None else "failed"


def _runs_one(n) -> str:
    if n is None:
        return "not recorded"
    return "1 (single run)" if n == 1 else f"{n} (median)" if n > 1 else "0"


def _runs(ours: dict | None, peer: dict | None, counts: tuple) -> str:
    """``counts`` = successful runs (ours, peer); failures come from each side's ``errors``."""
    a, b = counts
    text = _runs_one(a) if a == b else f"ours {_runs_one(a)}, peer {_runs_one(b)}"
    errors = [f"{who}: {e}" for who, side in (("ours", ours), ("peer", peer)) if side for e in side.get("errors") or []]
    if errors:
        text += f"; {len(errors)} failed ({errors[0][:100]}{' …' if len(errors) > 1 else ''})"
    return _cell(text)


def _size(size) -> str:
    """GPT-2's '124m' -> '124M'; a model's name ('smollm2-135m') as it is."""
    return str(size).upper() if str(size)[:-1].isdigit() and str(size).lower().endswith("m") else str(size)


# --------------------------------------------------------------------------- tables
def machine_line(result: dict) -> str:
    m = result.get("machine") or {}
    host = ", ".join(x for x in (m.get("cpu"), f"{m['cores']} cores" if m.get("cores") else None) if x)
    parts = [f"{m['gpu']} (host: {host})" if m.get("gpu") else host]
    parts += [f"torch {m['torch']}" if m.get("torch") else "", f"Python {m['python']}" if m.get("python") else ""]
    parts = [p for p in parts if p]
    mm = m.get("matmul")
    if mm:
        threads = mm.get("threads")
        parts.append(f"{mm.get('shape', '')} matmul{f' on {threads} thread' + ('s' if threads != 1 else '') if threads else ''}"
                     f": fp32 {mm['fp32_gflops']:,.0f} GFLOP/s, bf16 {mm['bf16_gflops']:,.0f} GFLOP/s")
    if m.get("cpu_flags"):
        parts.append("flags " + " ".join(m["cpu_flags"]))
    return ("Machine (from the JSON): " + "; ".join(parts) + ".") if parts else "Machine: not recorded in the JSON."


def _has_flops(result: dict) -> bool:
    return bool((result.get("machine") or {}).get("matmul")) and any(
        "flops_per_token" in r for r in result.get("train") or [])


def _share(side: dict | None) -> str:
    share = side.get("matmul_share") if side else None
    return f"{100 * share:.0f}%" if share else "—"


def train_table(result: dict) -> list[str]:
    rows = result.get("train") or []
    mem = "peak GPU memory" if (result.get("machine") or {}).get("gpu") else "peak RSS"
    flops = _has_flops(result)
    header = (f"| training job (case, precision, seq, size, batch) | loratune tok/s | {PEER_NAMES['train']} tok/s | "
              f"speed-up | loratune {mem} | peer {mem} | memory ratio | runs | loss after the last step (ours / peer) |"
              + (" share of the matmul rate (ours / peer) |" if flops else ""))
    lines = [header, "|" + "---|" * (10 if flops else 9)]
    for row in rows:
        a, b = _side(row, OURS), _side(row, PEERS["train"])
        job = _train_job(result, row)
        counts = tuple(s.get("runs") if s else None for s in (a, b))
        lines.append(f"| {_cell(job)} | {_tps(a)} | {_tps(b)} | {_speedup(a, b)} | {_mem(a)} | "
                     f"{_mem(b)} | {_ratio(a, b, 'peak_memory')} | {_runs(a, b, counts)} | {_loss(a)} / {_loss(b)} |"
                     + (f" {_share(a)} / {_share(b)} |" if flops else ""))
    return lines


def best_precision_lines(result: dict) -> list[str]:
    """Per (size, seq, case, batch) with more than one precision: each side's fastest against the other's."""
    groups: dict[str, list[dict]] = {}
    for row in result.get("train") or []:
        groups.setdefault(_train_job(result, row, precision=False), []).append(row)
    lines = []
    for job, rows in groups.items():
        best = [max((r for r in rows if _ok(_side(r, who))), key=lambda r, w=who: r[w]["tokens_per_s"], default=None)
                for who in (OURS, PEERS["train"])]
        if len(rows) < 2 or None in best:
            continue
        (ra, rb), (a, b) = best, (best[0][OURS], best[1][PEERS["train"]])
        lines.append(f"- {job}: loratune {ra['precision']} "
                     f"{a['tokens_per_s']:,.0f} tok/s, {_mem(a)} vs the peer's {rb['precision']} "
                     f"{b['tokens_per_s']:,.0f} tok/s, {_mem(b)}: {_speedup(a, b)}, memory ratio "
                     f"{_ratio(a, b, 'peak_memory')}")
    return (["Each side's fastest precision against the other's:", ""] + lines) if lines else []


def generate_table(result: dict) -> list[str]:
    rows = result.get("generate") or []
    mem = "peak GPU memory" if (result.get("machine") or {}).get("gpu") else "peak RSS"
    what = "size, precision, batch, new tokens" if any("size" in r for r in rows) else "precision, batch"
    header = (f"| greedy generation ({what}) | loratune tok/s | {PEER_NAMES['generate']} tok/s | speed-up | "
              f"loratune {mem} | peer {mem} | memory ratio | runs | first 8 tokens agree |")
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        a, b = _side(row, OURS), _side(row, PEERS["generate"])
        repeats = _one([c.get("repeats") for c in _gen_commands(result, row)])
        counts = tuple(None if s is None else s["runs"] if "runs" in s
                       else None if repeats is None else repeats - len(s.get("errors") or []) for s in (a, b))
        ta, tb = (s.get("first_tokens") if s else None for s in (a, b))
        agree = "yes" if ta and ta == tb else "no" if ta and tb else "—"
        job = _gen_job(result, row)
        lines.append(f"| {_cell(job)} | {_tps(a)} | {_tps(b)} | {_speedup(a, b)} | {_mem(a)} | "
                     f"{_mem(b)} | {_ratio(a, b, 'peak_memory')} | {_runs(a, b, counts)} | {agree} |")
    return lines


def _train_job(result: dict, row: dict, precision: bool = True) -> str:
    batch = row["batch"] if "batch" in row else _one([c.get("batch") for c in _train_commands(result, row)])
    return (f"{row.get('case')}, " + (f"{row.get('precision')}, " if precision else "")
            + f"seq {row.get('seq')}, {_size(row.get('size'))}, "
            + (f"batch {batch}" if batch is not None else "batch not recorded")
            + (f", {row['variant']}" if row.get("variant") else ""))


def _gen_job(result: dict, row: dict) -> str:
    model = f"{_size(row['size'])}, " if "size" in row else ""
    new = f", {row['new_tokens']} new tokens" if "new_tokens" in row else ""
    how = "".join(f", {row[k]}" for k in ("path", "stage") if row.get(k))  # bench_generate.py's rows
    peer = f", vs {row['peer']}" if row.get("peer") else ""
    return f"{model}{row.get('precision')}, batch {row.get('batch')}{new}{how}{peer}"


def slower_line(result: dict) -> str:
    """How many rows of each table have loratune slower than the peer, and which."""
    parts, names = [], []
    for kind, name, job in (("train", "training", _train_job), ("generate", "generation", _gen_job)):
        rows = result.get(kind) or []
        if not rows:
            continue
        slower = [r for r in rows if _slower(_side(r, OURS), _side(r, PEERS[kind]))]
        failed = sum(1 for r in rows if not (_ok(_side(r, OURS)) and _ok(_side(r, PEERS[kind]))))
        parts.append(f"{len(slower)} of {len(rows)} {name} rows" + (f" ({failed} with a failed side)" if failed else ""))
        for r in slower:
            a, b = _side(r, OURS), _side(r, PEERS[kind])
            q = a["tokens_per_s"] / b["tokens_per_s"]
            names.append(f"{job(result, r)}: {q:.2f}x" if f"{q:.2f}" != "1.00" else f"{job(result, r)}: {q:.4f}x")
    return ("loratune is slower than the peer in " + " and ".join(parts)
            + (f": {'; '.join(names)}." if names else "."))


def clock_line(result: dict) -> str | None:
    """What the tokens/s are per, where a command timed CPU time instead of the wall clock."""
    clocks = {c.get("clock", "wall") for c in _commands(result)}
    if "cpu" not in clocks:
        return None
    which = "every command" if clocks == {"cpu"} else "the commands with `--clock cpu`"
    return (f"Tokens/s and the matmul rate are per CPU-second of the job's one thread for {which} (process time, "
            "`--threads 1 --clock cpu`: other processes shared the cores, so wall-clock time measured them too).")


def load_table(result: dict) -> str:
    """benchmarks/load_rss.py's results: peak RSS of loading a sharded checkpoint, per reader."""
    m, c = result["machine"], result["checkpoint"]
    out = [f"Machine (from the JSON): {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; torch {m['torch']}, "
           f"safetensors {m['safetensors']}. Checkpoint: {c['layers']} Llama-shaped layers, hidden {c['hidden']}, "
           f"{c['shards']} shards, {c['files_gib']} GiB of {c['dtype']}; page cache {result['page_cache']}; "
           f"`{result['command']}`.", "",
           "| reader, result dtype | weights in memory (GiB) | peak RSS (GiB) | peak RSS / weights | process baseline "
           "(GiB) | seconds until every page is resident | runs |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        runs = "1 (single run)" if r.get("single_run") else str(r.get("runs", "?"))
        out.append(f"| {r['case']} | {r['weights_gib']:.3f} | {r['peak_rss_gib']:.3f} | {r['ratio']:.2f} | "
                   f"{r['baseline_rss_gib']:.3f} | {r['ready_seconds']:.2f} | {runs} |")
    return "\n".join(out)


def guard_table(result: dict) -> str:
    """benchmarks/guard_accuracy.py's results: the memory guard's estimate against measured peaks."""
    m = result["machine"]
    out = [f"Machine (from the JSON): {m['cpu']}, {m['cores']} cores; torch {m['torch']}. Estimate: what the "
           "training loop logs as \"memory estimate\"; measured: peak RSS during two real training steps minus the "
           f"RSS before the model was built (see the script's docstring); tolerance {result['tolerance']:.0%}.", "",
           "| model | case | precision | batch x seq | estimate (GiB) | measured (GiB) | estimate / measured | runs |",
           "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        runs = "1 (single run)" if r.get("single_run") else str(r.get("runs", "?"))
        out.append(f"| {r['model']} | {r['case']} | {r['precision']} | {r['batch']} x {r['seq']} | "
                   f"{r['estimate'] / 2**30:.2f} | {r['measured'] / 2**30:.2f} | {r['ratio']:.2f} | {runs} |")
    return "\n".join(out)


def packing_table(result: dict) -> str:
    """benchmarks/bench_packing.py's results: packed vs padded rows of the same examples, a row per arm."""
    d, mdl, cpu = result.get("data") or {}, result.get("model") or {}, result.get("clock") == "cpu"
    clock = ("CPU-second of one thread (`--threads 1 --clock cpu`; wall-clock rates in the JSON)" if cpu
             else "wall-clock second")
    intro = (f"GPT-2 {_size(mdl.get('size'))} shape, random weights, GPT-2's tokenizer; LoRA {mdl.get('targets')} "
             f"r={mdl.get('r')} alpha={mdl.get('alpha')}. {d.get('source')}: {d.get('records')} posts -> "
             f"{d.get('examples')} completion examples (`{d.get('prompt_template')!r}` -> "
             f"`{d.get('completion_template')!r}`, the completion trained); both arms train the same examples "
             f"(checked). Rates are per {clock}, over each arm's timed steps (a stratified sample of the epoch's "
             f"batches); one epoch = its real tokens / real tokens per second. `{result.get('command')}`")
    header = ("| arm | precision, seq, rows per step | rows | steps per epoch | padding (timed steps / epoch) | real "
              "tokens/s | trained tokens/s | positions/s | one epoch (estimated) | share of the matmul rate (all "
              "positions / real tokens) | runs |")
    out = [machine_line(result), "", intro, "", header, "|" + "---|" * 11]
    for r in result.get("rows") or []:
        useful = _share({"matmul_share": r.get("useful_matmul_share")})
        out.append(f"| {r['arm']} | {r['precision']}, {r['seq']}, {r['batch']} | {r['rows']} | {r['steps_per_epoch']} | "
                   f"{100 * r['pad_share_timed']:.1f}% / {100 * r['pad_share_epoch']:.1f}% | {r['real_tokens_per_s']:,.0f} "
                   f"| {r['trained_tokens_per_s']:,.1f} | {r['positions_per_s']:,.0f} | {r['epoch_s'] / 60:.1f} min | "
                   f"{_share(r)} / {useful} | {_runs_one(r.get('runs'))}, {r['warmup']} warm-up + {r['steps']} timed steps |")
    gains = [_packing_gain(c) for c in result.get("comparisons") or []]
    title = "Packed against padded (the median over runs of each run's ratio; a run's two arms alternate steps):"
    return "\n".join(out + ["", title, ""] + gains)


def _packing_gain(c: dict) -> str:
    """packed / padded at one (precision, seq), and what the gain comes from."""
    runs = c.get("runs_real_tokens_per_s") or []
    each = f" (each run: {', '.join(f'{x:.2f}x' for x in runs)})" if len(runs) > 1 else ""
    return (f"- {c['precision']}, seq {c['seq']}: packed / padded real tokens/s **{c['real_tokens_per_s']:.2f}x**{each}, "
            f"epoch time **{c['epoch_time']:.2f}x**. The gain is less padding computed ({c['epoch_positions']:.2f}x the "
            f"positions per epoch; padding {100 * c['pad_share_epoch'][0]:.1f}% -> {100 * c['pad_share_epoch'][1]:.1f}%) "
            f"and {c['real_per_step']:.2f}x the real tokens per step; positions per second {c['positions_per_s']:.2f}x "
            f"(timed rows of {c['mean_T'][0]:.0f} -> {c['mean_T'][1]:.0f} positions on average, attention growing with "
            f"the row; the output head runs only on loss chunks holding a trained token: "
            f"{c['head_per_position']:.2f}x as many per position packed).")


def render(result: dict) -> str:
    """The machine line, the tables and the slower-rows line of one results file."""
    if result.get("format") in RENDERERS:
        return RENDERERS[result["format"]](result)
    if result.get("format") == "packing":
        return packing_table(result)
    if "checkpoint" in result and "rows" in result:
        return load_table(result)
    if "tolerance" in result and "rows" in result:
        return guard_table(result)
    out = [machine_line(result), ""]
    if clock_line(result):
        out += [clock_line(result), ""]
    if result.get("train") or not result.get("generate"):  # a generation-only file (bench_generate.py) has none
        out += train_table(result)
    if _has_flops(result) and best_precision_lines(result):
        out += [""] + best_precision_lines(result)
    if result.get("generate"):
        out += ([""] if result.get("train") else []) + generate_table(result)
    out += ["", slower_line(result)]
    return "\n".join(out)


def render_file(path: str | Path) -> str:
    return render(load(path))


def block(path: str) -> str:
    """``render_file`` wrapped in the pages' marker comments (``path`` as written in the marker)."""
    return f"<!-- table: {path} -->\n{render_file(path)}\n<!-- end table -->"


def table_rows(markdown: str) -> list[str]:
    """The data rows of every table in ``markdown`` (no header or separator lines)."""
    lines = markdown.splitlines()
    seps = {i for i, line in enumerate(lines) if line.startswith("|---")}
    return [line for i, line in enumerate(lines) if line.startswith("|") and i not in seps and i + 1 not in seps]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="results JSON written by benchmarks/bench_train.py")
    ap.add_argument("--markers", action="store_true", help="wrap each file's tables in the marker comments docs/benchmarks.md uses")
    args = ap.parse_args(argv)
    outputs = [block(f) if args.markers else render_file(f) for f in args.files]
    print("\n\n".join(outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
