"""What activation checkpointing buys and costs: peak memory and step time at seq 1024, with and without.

Models (random weights, loratune's own model code, built as ``init-model`` builds them:
``family.build(family.config_from_hf(preset)).init_weights()``):

- ``gpt2-124m``: GPT-2 124M (12 layers of 768, vocab 50,257);
- ``smollm2-135m``: a Llama-shaped decoder, SmolLM2-135M's shape (30 layers of 576, grouped-query
  attention 9/3 heads, SwiGLU 1,536, vocab 49,152);
- ``llama3.2-1b-4l`` (not in the default grid): Llama-3.2-1B's widths (2,048, GQA 32/8, MLP 8,192,
  vocab 128,256) with 4 of its 16 layers.

Each made ready as ``setup_model`` makes a loaded model: LoRA on q,v (r=4, alpha=32, no dropout),
only the adapter trainable, bf16 storage for ``bf16-true``, then
``set_activation_checkpointing(model, on)`` (``common.ready_model``). One training step is a
``TrainingSession`` step (forward, backward, clipping, AdamW: the step ``loratune train`` runs) on one sequence of 1,024 seeded random tokens (batch 1).

Each measurement runs in a fresh subprocess (freed memory stays with the allocator, so two
measurements in one process would see each other): first one step of a tiny model of the same
family, precision and setting (code pages, oneDNN kernels, the allocator's arenas resident), then
the model, then ``rss_before`` (VmRSS just before the first step; the model and the optimizer are
built by then, AdamW's moments not yet). The peak over ``--warmup + --steps`` steps is read twice:
``ru_maxrss`` (``resource.getrusage``: the process's lifetime peak, which may include building the
model in float32 before the bf16 cast) and VmHWM after ``/proc/self/clear_refs`` reset it to the RSS
just before the steps. The table's "step peak" is VmHWM - rss_before: what the steps add to what
the ready model holds (the quantity the memory guard estimates; its estimate is in the row too).
Step time: the median of the ``--steps`` timed steps after ``--warmup`` untimed ones, by wall clock
and by process CPU time (``--threads`` intra-op threads). The parent never imports torch: on Linux a
child's ``ru_maxrss`` starts at its parent's peak across fork and exec. The settings alternate
(off, on, on, off, ...) over ``--repeats``, so both see the same neighbours on a shared machine.

    python benchmarks/bench_checkpointing.py                  # the default grid (~10 min on 2 cores)
    python benchmarks/bench_checkpointing.py --models llama3.2-1b-4l --precisions bf16-true

Results go to benchmarks/results/checkpointing.json (``--out``); the table is printed (``report_memory.checkpointing_table``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import bench_families as families
import common
import report_memory  # the results table
from common import ready_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "checkpointing.json"
MODELS = {  # label -> (model_type, loratune preset, overrides)
    "gpt2-124m": ("gpt2", "gpt2", {}),
    "smollm2-135m": ("llama", "smollm2-135m", {}),
    "llama3.2-1b-4l": ("llama", "llama3.2-1b", {"num_hidden_layers": 4}),
}
MIB = 2**20


# --------------------------------------------------------------------------- one measurement, in a subprocess
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _recipe(spec: dict, seq: int):
    from loratune.recipe import load_recipe

    return load_recipe(None, ["finetune=lora", f"precision={spec['precision']}", "device=cpu", f"seq_len={seq}",
                              "batch_size=1", "grad_accum=1", "lr=1e-4", "max_grad_norm=1.0", "seed=0",
                              "lora.r=4", "lora.alpha=32", "lora.dropout=0.0", "lora.targets=q,v",
                              f"activation_checkpointing={str(spec['checkpointing']).lower()}"])


def run_steps(model, recipe, seq: int, n: int, reset_peak: bool = False) -> list[tuple[float, float, float]]:
    """``n`` steps of the model's training session on seeded random tokens; (wall s, CPU s, loss) per step."""
    import torch

    session = common.session(model, recipe)
    ids = torch.randint(0, model.config.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = common.lm_batch(ids)
    if reset_peak:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts at the current RSS
    out = []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        result = session.step(batch)
        out.append((time.perf_counter() - t0, time.process_time() - c0, result.loss))
    return out


def run_job(spec: dict) -> dict:
    """One (model, precision, checkpointing) measurement (see the module docstring)."""
    import gc
    import resource

    import torch

    from loratune.models.registry import find_family
    from loratune.train.guards import estimate_training_memory

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    model_type, preset_name, overrides = MODELS[spec["model"]]
    presets = find_family(model_type).presets
    warm = _recipe(spec, 32)
    run_steps(ready_model(model_type, {**presets["tiny"], "vocab_size": 1024}, warm), warm, 32, 1)
    gc.collect()
    recipe = _recipe(spec, spec["seq"])
    model = ready_model(model_type, {**presets[preset_name], **overrides}, recipe)
    gc.collect()
    before = _status("VmRSS")
    steps = run_steps(model, recipe, spec["seq"], spec["warmup"] + spec["steps"], reset_peak=True)
    hwm, maxrss = _status("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = steps[spec["warmup"]:]
    est = estimate_training_memory(model, 1, spec["seq"], spec["precision"], "lora")
    return {**spec, "rss_before": before, "vmhwm": hwm, "ru_maxrss": maxrss, "step_peak": hwm - before,
            "ru_maxrss_minus_before": maxrss - before, "estimate": est.total, "estimate_step": est.total - est.weights,
            "estimate_activations": est.activations,
            "wall_s": statistics.median(s[0] for s in timed), "cpu_s": statistics.median(s[1] for s in timed),
            "losses": [round(s[2], 6) for s in steps]}


def matmul_job(threads: int) -> dict:
    """The machine's matmul rate (bench_families.matmul_rate), in a subprocess like the jobs."""
    import torch

    torch.set_num_threads(threads)
    return {"matmul": families.matmul_rate(clock="cpu"), "torch": torch.__version__,
            "cpu_flags": families.cpu_flags()}


def in_subprocess(mode: str, payload: dict) -> dict:
    return common.in_subprocess(__file__, payload, flag=mode, timeout=1800,
                                env={"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": str(payload.get("threads", 1))})


# --------------------------------------------------------------------------- the grid, the summary, the table
def summarise(runs: list[dict]) -> list[dict]:
    """One row per (model, precision, checkpointing): medians over repeats, and on / off ratios."""
    rows = []
    keys = sorted({(r["model"], r["precision"]) for r in runs if "error" not in r}, key=str)
    for model, precision in keys:
        side = {}
        for on in (False, True):
            mine = [r for r in runs if (r["model"], r["precision"], r["checkpointing"]) == (model, precision, on)
                    and "error" not in r]
            if mine:
                side[on] = {k: statistics.median(r[k] for r in mine) for k in
                            ("rss_before", "ru_maxrss", "step_peak", "ru_maxrss_minus_before", "estimate",
                             "estimate_step", "wall_s", "cpu_s")}
                side[on]["runs"] = len(mine)
                side[on]["same_losses"] = len({json.dumps(r["losses"]) for r in mine}) == 1
        for on, values in side.items():
            row = {"model": model, "precision": precision, "checkpointing": on, **values}
            if on and False in side:
                off = side[False]
                row.update(peak_ratio=values["step_peak"] / off["step_peak"], time_ratio=values["cpu_s"] / off["cpu_s"])
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", default="gpt2-124m,smollm2-135m", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--precisions", default="fp32,bf16-true")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (AdamW's moments appear at step 1)")
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    info = in_subprocess("--matmul", {"threads": 1})
    result = {"format": "checkpointing", "command": "python benchmarks/bench_checkpointing.py " + shlex.join(
        sys.argv[1:] if argv is None else argv), "args": vars(args),
        "machine": {"cpu": families.cpu_name() or platform.machine(), "cores": os.cpu_count(), **info},
        "loadavg_start": list(os.getloadavg()), "runs": [], "rows": []}
    start = time.perf_counter()
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            for k in range(args.repeats):
                for on in ((False, True) if k % 2 == 0 else (True, False)):
                    spec = {"model": model, "precision": precision, "checkpointing": on, "seq": args.seq,
                            "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
                    run = in_subprocess("--worker", spec)
                    result["runs"].append(run)
                    print(json.dumps({k: v for k, v in run.items() if k != "losses"}), file=sys.stderr, flush=True)
                    result["rows"] = summarise(result["runs"])
                    result["seconds"] = round(time.perf_counter() - start)
                    out.write_text(json.dumps(result, indent=2) + "\n")  # a run cut short keeps its rows
    print(report_memory.checkpointing_table(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--worker", "--matmul"):
        payload = json.loads(sys.argv[2])
        print(json.dumps(run_job(payload) if sys.argv[1] == "--worker" else matmul_job(payload["threads"])))
    else:
        main()
