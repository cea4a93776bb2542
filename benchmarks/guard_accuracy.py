"""How close the memory guard's estimate is to the peak memory of real training steps, per family.

For Llama-style models of published shapes (random weights: SmolLM2-135M, Qwen3-0.6B, and the
small Gemma 3 and Phi-3 presets), each fine-tuning case (LoRA on q,v; LoRA on every linear
projection; full fine-tuning), precision (fp32, bf16-true) and sequence length, a fresh
subprocess runs two optimizer steps the way ``loratune train`` runs them, and the row reports the
guard's estimate (``estimate_training_memory``: what the training loop logs as "memory estimate"
and ``check_resources`` compares with the free memory) over the measured peak.

What is compared. The estimate's total claims everything the run holds from the loaded model on:
the weights (as the precision stores them), the gradients, AdamW's state, the activations saved
for the backward pass and the transient workspace; not the Python interpreter, torch's libraries
and the code pages. ``check_resources`` treats it the same way (what is free now plus what the
loaded model already holds). So the measured side is

    measured = VmHWM during the steps - VmRSS before the model was built

in one process: first a warm-up step of a tiny model of the same family, precision and case (so
the code, oneDNN's kernels and the allocator's arenas are resident, and freed), then the
baseline VmRSS; the model is built (``family.config_from_hf({"model_type": ..., **preset})``,
``family.build(config).init_weights()``) and made ready as ``setup_model`` makes a loaded one
(``common.ready_model``: ``inject_lora``, ``set_trainable``, ``store_in_bf16``; no checkpoint is
read), and its ``TrainingSession`` (the loop's optimizer and step) is made; then /proc/self/clear_refs
resets the peak (VmHWM) to the current RSS, so building the model in float32 before a bf16 cast does
not count, and the session's step runs twice: the second step is the steady state, whose backward pass already holds AdamW's moments and
whose allocator already holds the first step's freed blocks (one step measured up to 15% less).
The row also shows what the ready model held before the steps (``resident``), against the
estimate's ``weights``.

Every row is a single run (``single_run: true``). Workers run with PYTHONHASHSEED=0: the order of
some allocations follows string hashes, and the allocator's reuse of freed blocks with it (peaks
of a small model varied by ~10% from run to run without it, ~2% with it). Token ids are seeded.

``--reestimate`` recomputes the estimates of earlier runs' rows with the current guard (the
measured peaks do not depend on it), e.g. after calibrating a family's memory profile.

    python benchmarks/guard_accuracy.py            # the grid: 48 rows, ~30 min on 2 idle cores, < 13 GiB RAM
    python benchmarks/guard_accuracy.py --quick    # 12 rows (no Qwen3-0.6B, seq 128, LoRA q,v + full), ~8 min
    python benchmarks/guard_accuracy.py --models smollm2-135m --seqs 128
    python benchmarks/guard_accuracy.py --reestimate benchmarks/results/guard_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import common
from common import ready_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "guard_accuracy.json"
MODELS = {  # label -> (model_type, preset, micro-batch at seq 128, micro-batch at seq 512)
    "smollm2-135m": ("llama", "smollm2-135m", 4, 1),
    "qwen3-0.6b": ("qwen3", "qwen3-0.6b", 1, 1),
    "gemma3-small": ("gemma3_text", "small", 8, 2),
    "phi3-small": ("phi3", "small", 16, 4),
}
CASES = {"lora-qv": ("lora", "q,v"), "lora-all": ("lora", "all-linear"), "full": ("full", None)}
PRECISIONS = ("fp32", "bf16-true")
TOLERANCE = 0.15


# --------------------------------------------------------------------------- one case, in a subprocess
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _recipe(case: str, precision: str, seq: int, batch: int):
    from loratune.recipe import load_recipe

    finetune, targets = CASES[case]
    overrides = [f"finetune={finetune}", f"precision={precision}", "device=cpu", f"seq_len={seq}",
                 f"batch_size={batch}", "grad_accum=1", "lr=1e-4", "max_grad_norm=1.0", "seed=0"]
    if targets:
        overrides += ["lora.r=8", "lora.alpha=16", "lora.dropout=0.0", f"lora.targets={targets}"]
    return load_recipe(None, overrides)


def train_steps(model, recipe, seq: int, batch: int, steps: int) -> float:
    """``steps`` steps of the model's training session on seeded random ids, the peak reset before the first;
    returns seconds per step."""
    import torch

    session = common.session(model, recipe)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts at the current RSS
    t0 = time.perf_counter()
    for _ in range(steps):
        session.step(common.lm_batch(ids))
    return (time.perf_counter() - t0) / steps


def run_case(spec: dict) -> dict:
    """Warm-up on a tiny model, baseline RSS, the model, the measured steps; the row (see module docstring)."""
    import gc

    import torch

    from loratune.models.registry import find_family

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"] or os.cpu_count())
    model_type, preset_name, case, precision = spec["model_type"], spec["preset"], spec["case"], spec["precision"]
    presets = find_family(model_type).presets
    tiny = {**presets["tiny"], "vocab_size": 1024}
    warm = _recipe(case, precision, 32, 2)
    train_steps(ready_model(model_type, tiny, warm), warm, 32, 2, 1)
    gc.collect()
    base = _status("VmRSS")
    recipe = _recipe(case, precision, spec["seq"], spec["batch"])
    model = ready_model(model_type, {**presets[preset_name], **spec.get("overrides", {})}, recipe)
    gc.collect()
    resident = _status("VmRSS") - base
    seconds = train_steps(model, recipe, spec["seq"], spec["batch"], spec["steps"])
    measured = _status("VmHWM") - base
    row = {**spec, "measured": measured, "resident": resident, "step_s": round(seconds, 2), "single_run": True}
    return {**row, **estimate_row(model, row)}


def estimate_row(model, row: dict) -> dict:
    """The guard's estimate for ``row``'s micro-batch, sequence, precision and case, by part, and over the peak."""
    from loratune.train.guards import estimate_training_memory

    est = estimate_training_memory(model, row["batch"], row["seq"], row["precision"], CASES[row["case"]][0])
    parts = {k: getattr(est, k) for k in ("weights", "gradients", "optimizer", "activations", "workspace")}
    return {"estimate": est.total, "ratio": est.total / row["measured"], "parts": parts}


def in_subprocess(spec: dict) -> dict:
    return common.in_subprocess(__file__, spec, timeout=900, env={"PYTHONHASHSEED": "0"})


def row_line(r: dict) -> str:
    """One markdown table row."""
    head = f"| {r['model']} | {r['case']} | {r['precision']} | {r['batch']} x {r['seq']} |"
    if "error" in r:
        return head + f" failed: {r['error'][:100]} ||||"
    gib = 2**30
    flag = "" if abs(r["ratio"] - 1) <= TOLERANCE else " **off**"
    return head + (f" {r['estimate'] / gib:.2f} | {r['measured'] / gib:.2f} | {r['ratio']:.3f}{flag} | "
                   f"{r['resident'] / gib:.2f} / {r['parts']['weights'] / gib:.2f} |")


def format_table(rows: list[dict]) -> str:
    lines = [("| model | case | precision | batch x seq | estimate GiB | measured GiB | estimate / measured | "
              "resident / estimated weights GiB |"), "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [row_line(r) for r in rows])


def measure(args: argparse.Namespace, out: Path) -> dict:
    """The grid, one fresh subprocess per row; the results are rewritten after each row."""
    result = {"machine": common.machine(), "command": "python benchmarks/guard_accuracy.py " + shlex.join(sys.argv[1:]),
              "tolerance": TOLERANCE, "seconds": 0, "rows": []}
    start = time.perf_counter()
    for label in args.models.split(","):
        model_type, preset, batch_128, batch_512 = MODELS[label]
        for seq in map(int, args.seqs.split(",")):
            for case in args.cases.split(","):
                for precision in args.precisions.split(","):
                    spec = {"model": label, "model_type": model_type, "preset": preset, "case": case,
                            "precision": precision, "seq": seq, "batch": batch_128 if seq <= 128 else batch_512,
                            "steps": args.steps, "threads": args.threads}
                    result["rows"].append(in_subprocess(spec))
                    result["seconds"] = round(time.perf_counter() - start)
                    out.write_text(json.dumps(result, indent=2) + "\n")  # a run cut short keeps its rows
                    print(row_line(result["rows"][-1]), file=sys.stderr, flush=True)
    return result


def reestimate(paths: list[str]) -> dict:
    """Earlier runs' rows (their measured peaks) with the current guard's estimates."""
    from loratune.models.registry import find_family

    runs = [json.loads(Path(p).read_text()) for p in paths]
    result = {"machine": runs[0]["machine"], "commands": [c for r in runs for c in r.get("commands", [r.get("command")])],
              "reestimated_with": "python benchmarks/guard_accuracy.py " + shlex.join(sys.argv[1:]),
              "tolerance": TOLERANCE, "seconds": sum(r["seconds"] for r in runs), "rows": []}
    models: dict[tuple, object] = {}
    for row in ({**row, "measured_by": row.get("measured_by") or r.get("command")} for r in runs for row in r["rows"]):
        if "error" not in row:
            key = (row["model_type"], row["preset"], row["case"], row["precision"], json.dumps(row.get("overrides")))
            if key not in models:
                preset = {**find_family(row["model_type"]).presets[row["preset"]], **row.get("overrides", {})}
                recipe = _recipe(row["case"], row["precision"], row["seq"], row["batch"])
                models[key] = ready_model(row["model_type"], preset, recipe, init=False)
            row = {**row, **estimate_row(models[key], row)}
        result["rows"].append(row)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="SmolLM2, Gemma 3 and Phi-3 shapes, seq 128, LoRA q,v and full")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--seqs", default="128,512")
    ap.add_argument("--steps", type=int, default=2, help="training steps measured per row (see the docstring)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per row (0 = all cores)")
    ap.add_argument("--reestimate", nargs="+", metavar="JSON", help="recompute the estimates of these results' rows")
    ap.add_argument("--note", help="a remark stored with the results")
    ap.add_argument("--out", default=str(RESULTS.relative_to(ROOT)))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    if args.quick:
        args.models, args.seqs, args.cases = "smollm2-135m,gemma3-small,phi3-small", "128", "lora-qv,full"
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    result = reestimate(args.reestimate) if args.reestimate else measure(args, out)
    if args.note:
        result["note"] = args.note
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result["rows"]))
    off = [r for r in result["rows"] if "error" in r or abs(r["ratio"] - 1) > TOLERANCE]
    print(f"\n{len(result['rows'])} rows, {len(off)} outside {TOLERANCE:.0%}; raw results: {out}")


if __name__ == "__main__":
    main()
