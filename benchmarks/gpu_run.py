"""The GPU run, in one command under a time budget: parity, training, generation and serving on a lent
H100/H200, loratune against transformers + PEFT (+ bitsandbytes), written to benchmarks/results/gpu-<gpu>.json.

    python benchmarks/gpu_run.py                     # on a CUDA machine: ~7.5 minutes, then stops by itself
    python benchmarks/gpu_run.py --dry-run           # the same code on the CPU, tiny shapes, 1 step: ~2 minutes
    python benchmarks/gpu_run.py --prepare-carry .gpu_carry   # here, once: what the device machine lacks

Sections, in this order, each with its own budget in seconds (capped by what is left of ``--budget``); a row
that no longer fits is recorded as skipped with the reason, never silently left out:

- ``parity``: each Llama-style family's logits against transformers' on tiny random checkpoints with
  large weights (tests/family_models.py), fp32 and bf16 on the device (limits: gpu_jobs.PARITY_FP32, PARITY_BF16_FACTOR);
- ``train``: LoRA and QLoRA (NF4, double quantization) training steps at seq 2048, batch 1, on random
  weights of the Llama-3.2-1B and Qwen3-0.6B shapes, bf16, LoRA r 16 on q and v: tokens/s, peak allocated
  and reserved memory, and the share of the bf16 matmul rate measured at the start (the roofline share);
- ``generate``: greedy decoding, batch 1 and 8, loratune's ``generate`` against transformers';
- ``serve``: ``loratune serve`` on 127.0.0.1 with 32 concurrent streaming clients over four adapters
  (benchmarks/serve_load.py's client), and transformers + PEFT one request at a time (no serving framework
  such as vLLM is on the machine: that peer is absent, and the row says so);
- ``train_compile``: the ``train`` rows with compilation: loratune's recipe ``compile: true`` (regional
  compile of the decoder blocks; "not available" where the recipe has no such field) against
  ``torch.compile`` of the peer's whole model; compile time = first step minus a timed step;
- ``gpt2_checks``: benchmarks/gpu_check.py (GPT-2 on CUDA: logits, LoRA, generation, training, DDP/FSDP2,
  serving), its PASS/FAIL lines as rows.

A summary at the end compares each pair with the goals (>= 1.5x the peer's tokens/s, <= 0.5x its peak
memory) and is stored in the JSON; ``python benchmarks/report_tables.py FILE`` renders it (report_gpu.py).
Every row is a single run. The exit status is the number of failed parity and GPT-2 checks.

The device machine has torch, transformers, PEFT and accelerate but not bitsandbytes, fastapi, uvicorn or
gguf, and no ../shared: ``--prepare-carry DIR`` (run here, with PyPI) installs those for Python 3.12 under
DIR/site (bitsandbytes without its binaries for older CUDA and ROCm, to fit the 64 MiB the machine takes),
and copies the Llama 3.1 and Qwen3 tokenizers, GPT-2's tokenizer files and 300 reddit_tifu posts; the run
names DIR in ``carry`` and points PYTHONPATH and the LORATUNE_BENCH_* variables at it (docs/benchmarks.md,
"The GPU run", has the exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
from common import ROOT

SECTIONS = ("parity", "train", "generate", "serve", "train_compile", "gpt2_checks")


@dataclass
class Plan:
    """What one run measures and how long each part may take."""

    shapes: dict[str, tuple[str, str, dict]]
    """name -> (model_type, loratune preset, config overrides: the dry run's tiny widths)."""
    seq: int
    """Training sequence length (batch 1)."""
    warmup: int
    """Untimed training steps before the timed ones (eager rows)."""
    steps: int
    """Timed training steps per row."""
    compile_warmup: int
    """Untimed steps of a compiled row (the first one compiles)."""
    compile_backend: str
    """torch.compile's backend for the peer's compiled rows."""
    gen: dict
    """Generation: shape, prompt tokens, new tokens, batches, warm-up runs, timed runs."""
    serve: dict
    """Serving: shape, clients, requests, max_tokens, peer_requests (transformers + PEFT, one at a time)."""
    matmul_n: int
    """Side of the square bf16 product whose rate is the roofline."""
    budget_s: float
    """The whole run's budget; a watchdog ends the process 30 s after it."""
    caps: dict[str, float] = field(default_factory=dict)
    """Most seconds per section (less where less of the budget is left)."""
    min_row_s: dict[str, float] = field(default_factory=dict)
    """Seconds a section's row needs at least: one is not started with less left."""


GPU_PLAN = Plan(
    shapes={"llama3.2-1b": ("llama", "llama3.2-1b", {}), "qwen3-0.6b": ("qwen3", "qwen3-0.6b", {})},
    seq=2048, warmup=2, steps=8, compile_warmup=3, compile_backend="inductor",
    gen={"shape": "llama3.2-1b", "prompt": 128, "new": 128, "batches": [1, 8], "warmup": 1, "runs": 2},
    serve={"shape": "llama3.2-1b", "clients": 32, "requests": 64, "max_tokens": 64, "peer_requests": 8},
    matmul_n=8192, budget_s=450,
    caps={"parity": 45, "train": 120, "generate": 60, "serve": 90, "train_compile": 150, "gpt2_checks": 120},
    min_row_s={"parity": 3, "train": 8, "generate": 5, "serve": 30, "train_compile": 25, "gpt2_checks": 60})
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 320, "bos_token_id": 0, "eos_token_id": 0}
"""The dry run's widths: the small BPE tokenizer trained on the spot (320 ids, ``</s>`` = 0) fits them."""
DRY_PLAN = Plan(
    shapes={"llama3.2-1b": ("llama", "llama3.2-1b", TINY), "qwen3-0.6b": ("qwen3", "qwen3-0.6b", {**TINY, "head_dim": 16})},
    seq=64, warmup=1, steps=1, compile_warmup=1, compile_backend="aot_eager",
    gen={"shape": "llama3.2-1b", "prompt": 16, "new": 8, "batches": [1, 8], "warmup": 0, "runs": 1},
    serve={"shape": "llama3.2-1b", "clients": 32, "requests": 32, "max_tokens": 4, "peer_requests": 4},
    matmul_n=512, budget_s=240,
    caps={"parity": 40, "train": 60, "generate": 20, "serve": 90, "train_compile": 90, "gpt2_checks": 0},
    min_row_s={"parity": 1, "train": 1, "generate": 1, "serve": 10, "train_compile": 5, "gpt2_checks": 60})
"""The same code paths on the CPU: tiny widths of the same families, one timed step, the compiled rows with
torch.compile's aot_eager backend on both sides (graph capture and autograd tracing without code generation,
to stay short: :func:`force_compile_backend`),
and no gpu_check.py (``python benchmarks/gpu_check.py cpu`` is its own dry run)."""
TOKENIZER_FOLDERS = {"llama3.2-1b": ["llama3_1"], "qwen3-0.6b": ["qwen3", "llama3_1"]}
"""Shape -> ../shared/tokenizers folders to use, first present wins (Llama 3.1's 128,256 ids fit Qwen3's
151,936-row embedding); none present: a small BPE trained on the spot."""


class SectionTimeout(BaseException):
    """A section's budget ran out mid-row (a BaseException, so library code's ``except Exception`` lets it by)."""


def _alarm(signum, frame):
    raise SectionTimeout


class Run:
    """One run's results file: saved after every row, so what was measured survives any stop."""

    def __init__(self, plan: Plan, path: Path, result: dict) -> None:
        self.plan, self.path, self.result = plan, path, result
        self.end = time.time() + plan.budget_s

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        tmp.replace(self.path)

    def section(self, name: str, jobs: list[tuple[dict, object]] | str) -> None:
        """Run ``jobs`` (row labels, and a callable returning a row or a list of rows) within the section's
        budget; ``jobs`` as a string is the reason the whole section is skipped."""
        sec: dict = {"rows": []}
        self.result["sections"][name] = sec
        left = self.end - time.time()
        allowed = min(self.plan.caps.get(name, 0), left)
        need = self.plan.min_row_s.get(name, 1)
        if isinstance(jobs, str) or allowed < need:
            sec["skipped"] = jobs if isinstance(jobs, str) else (
                f"no time: {max(left, 0):.0f} s of the run's budget left, the section's cap is "
                f"{self.plan.caps.get(name, 0):.0f} s and a row needs ~{need:.0f} s")
            print(f"== {name}: skipped ({sec['skipped']})", flush=True)
            self.save()
            return
        sec["budget_s"], t0 = round(allowed, 1), time.time()
        deadline = t0 + allowed
        print(f"== {name} (budget {allowed:.0f} s)", flush=True)
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, allowed)
        try:
            for i, (label, job) in enumerate(jobs):
                remaining = deadline - time.time()
                if remaining < need:
                    sec["rows"] += [{**lab, "skipped": f"the section's budget of {allowed:.0f} s was spent "
                                                       f"({max(remaining, 0):.0f} s left, a row needs ~{need:.0f} s)"}
                                    for lab, _ in jobs[i:]]
                    break
                try:
                    out = job(deadline)
                except SectionTimeout:
                    sec["rows"] += [{**label, "skipped": f"stopped at the section's budget of {allowed:.0f} s"}]
                    sec["rows"] += [{**lab, "skipped": "the section's budget was spent"} for lab, _ in jobs[i + 1:]]
                    print("  " + _row_line(sec["rows"][-len(jobs) + i]), flush=True)
                    break
                except Exception as exc:  # noqa: BLE001 - a failed row is reported, the run goes on
                    out = {**label, "error": f"{type(exc).__name__}: {exc}"[:400]}
                for row in out if isinstance(out, list) else [out]:
                    sec["rows"].append(row)
                    print("  " + _row_line(row), flush=True)
                self.save()
        except SectionTimeout:  # between rows
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        sec["spent_s"] = round(time.time() - t0, 1)
        self.save()


def _row_line(row: dict) -> str:
    keys = ("family", "shape", "case", "compile", "side", "batch", "clients", "check")
    head = ", ".join(f"{k}={row[k]}" for k in keys if k in row)
    if row.get("skipped") or row.get("error"):
        return f"{head}: {row.get('skipped') or 'ERROR ' + row['error']}"
    if "tokens_per_s" in row:
        return f"{head}: {row['tokens_per_s']:,.1f} tok/s"
    return f"{head}: {'ok' if row.get('ok') else 'FAILED'}"


# --------------------------------------------------------------------------- the run
def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; otherwise the name in lower case, letters and digits."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def machine(dev, tflops: float, n: int) -> dict:
    import torch

    info = common.machine(str(dev))
    for pkg in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as exc:  # noqa: BLE001 - recorded: a missing peer package is part of the result
            info[pkg] = f"absent ({type(exc).__name__})"
    info["cuda"] = torch.version.cuda
    info["matmul"] = {"bf16_tflops": tflops, "shape": f"{n}x{n}x{n}"}
    info["loadavg"] = os.getloadavg()[0]
    return info


def tokenizer_dir(shape: str) -> Path | None:
    import bench_families as families

    for folder in TOKENIZER_FOLDERS.get(shape, []):
        if (families.TOKENIZERS / folder / "tokenizer.json").is_file():
            return families.TOKENIZERS / folder
    return None


def plan_jobs(plan: Plan, ckpts: dict[str, Path], dev, tflops: float, work: Path, compiled: bool) -> list:
    import gpu_jobs

    jobs = []
    # the eager rows shape by shape; the compiled rows LoRA first (both shapes), as time may not reach QLoRA
    order = [(s, c) for s in ckpts for c in ("lora", "qlora")] if not compiled else \
        [(s, c) for c in ("lora", "qlora") for s in ckpts]
    for shape, case in order:
        for side in ("loratune", "transformers+peft"):
            spec = {"shape": shape, "case": case, "compile": compiled, "side": side, "seq": plan.seq, "batch": 1,
                    "ckpt": str(ckpts[shape]), "backend": plan.compile_backend,
                    "warmup": plan.compile_warmup if compiled else plan.warmup, "steps": plan.steps}
            label = {k: spec[k] for k in ("shape", "case", "compile", "side", "seq", "batch")}
            jobs.append((label, lambda deadline, s=spec: gpu_jobs.train_row(s, dev, tflops)))
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the CPU, tiny shapes, 1 step (no GPU needed)")
    ap.add_argument("--out-dir", type=Path, help="where the JSON goes (default: benchmarks/results on CUDA, a temp "
                                                  "dir for --dry-run)")
    ap.add_argument("--cache", type=Path, help="random checkpoints (default: a temp dir)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default: the plan's)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated; the others are skipped")
    ap.add_argument("--prepare-carry", type=Path, metavar="DIR", help="install and copy what the device lacks")
    args = ap.parse_args(argv)
    if args.prepare_carry:
        from gpu_carry import prepare_carry

        prepare_carry(args.prepare_carry)
        return 0
    for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):  # the log is read on another machine: no bars
        os.environ.setdefault(var, "1")
    import torch

    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget:
        plan.budget_s = args.budget
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    started = time.time()
    dev = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU" if args.dry_run else torch.cuda.get_device_name(dev)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="loratune-gpu-dry-")) if args.dry_run
                               else ROOT / "benchmarks" / "results")
    path = out_dir / ("cpu-dry-run.json" if args.dry_run else f"gpu-{gpu_slug(name)}.json")
    work = args.cache or Path(tempfile.mkdtemp(prefix="loratune-gpu-work-"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    torch.backends.cuda.matmul.allow_tf32 = False  # parity in fp32 means fp32 (the default; stated)
    threading.Thread(target=_watchdog, args=(plan.budget_s + 30, path), daemon=True).start()

    if plan.compile_backend != "inductor":
        force_compile_backend(plan.compile_backend)
    import gpu_jobs

    tflops = gpu_jobs.matmul_tflops(dev, plan.matmul_n)
    result = {"format": "gpu_run", "dry_run": args.dry_run, "device": name,
              "command": "python benchmarks/gpu_run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(dev, tflops, plan.matmul_n), "plan": asdict(plan), "sections": {},
              "goals": {"tokens_per_s_ratio_min": 1.5, "memory_ratio_max": 0.5}}
    run = Run(plan, path, result)
    run.end = started + plan.budget_s
    print(f"{name}: bf16 matmul {tflops:,.2f} TFLOP/s ({plan.matmul_n}^3); budget {plan.budget_s:.0f} s; "
          f"writing {path}", flush=True)
    t0 = time.time()
    ckpts: dict[str, Path] = {}
    for shape, (model_type, preset, overrides) in plan.shapes.items():
        tokenizer = None if args.dry_run else tokenizer_dir(shape)
        ckpts[shape] = gpu_jobs.make_checkpoint(model_type, preset, overrides, work, tokenizer)
    result["setup_s"] = round(time.time() - t0, 1)
    wanted = set(args.sections.split(","))

    def pick(section: str, jobs):
        return jobs if section in wanted else f"not asked for (--sections {args.sections})"

    run.section("parity", pick("parity", [
        ({"family": f}, lambda deadline, f=f: gpu_jobs.parity_row(f, work, dev)) for f in gpu_jobs.PARITY_FAMILIES]))
    run.section("train", pick("train", plan_jobs(plan, ckpts, dev, tflops, work, compiled=False)))
    gen = plan.gen
    run.section("generate", pick("generate", [
        ({"shape": gen["shape"], "side": side, "batch": b},
         lambda deadline, s={**gen, "side": side, "batch": b, "ckpt": str(ckpts[gen["shape"]])}: gpu_jobs.gen_row(s, dev))
        for b in gen["batches"] for side in ("loratune", "transformers")]))
    srv = {**plan.serve, "ckpt": str(ckpts[plan.serve["shape"]]), "root": str(work)}
    run.section("serve", pick("serve", [({"shape": srv["shape"], "clients": srv["clients"]},
                                         lambda deadline: gpu_jobs.serve_rows(srv, dev, deadline))]))
    run.section("train_compile", pick("train_compile", plan_jobs(plan, ckpts, dev, tflops, work, compiled=True)))
    checks = ("dry run: `python benchmarks/gpu_check.py cpu` is gpu_check's own dry run" if args.dry_run
              else pick("gpt2_checks", [({"check": "benchmarks/gpu_check.py cuda"}, gpt2_checks)]))
    run.section("gpt2_checks", checks)
    result["wall_s"] = round(time.time() - started, 1)
    from report_gpu import failed_checks, summary_lines

    result["summary"] = summary_lines(result)
    run.save()
    print("\n".join(["", "== summary", *result["summary"], f"wrote {path} ({result['wall_s']:.0f} s)"]), flush=True)
    return failed_checks(result)


def force_compile_backend(backend: str) -> None:
    """Every ``torch.compile`` in this process (loratune's ``compile: true`` too) with ``backend``: the dry run's
    aot_eager captures the same graphs and traces their backward without generating code, which on 2 CPU cores
    would take minutes per row."""
    import torch

    original = torch.compile

    def compile_with(model=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("mode", "options")}
        return original(model, **{**kwargs, "backend": backend})
    torch.compile = compile_with


def gpt2_checks(deadline: float) -> list[dict]:
    """benchmarks/gpu_check.py on CUDA in a subprocess, until ``deadline``; its PASS / FAIL / SKIP lines as rows."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "cuda"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False, timeout=max(1.0, deadline - time.time() - 5))
        text, note = done.stdout, None if done.returncode >= 0 else f"exit {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        note = "stopped at the section's budget"
        done = None
    rows = []
    for line in text.splitlines():
        m = re.match(r"(PASS|FAIL|SKIP)\s+([^:]+):\s*(.*)", line)
        if m:
            rows.append({"check": m.group(2), "ok": m.group(1) != "FAIL", "status": m.group(1), "detail": m.group(3)})
    if note or not rows:
        tail = (done.stderr.strip().splitlines()[-1:] if done is not None and done.stderr else [])
        rows.append({"check": "gpu_check.py", "skipped": note or f"no check lines: {' '.join(tail)[:300]}"})
    return rows


def _watchdog(seconds: float, path: Path) -> None:
    time.sleep(seconds)
    print(f"watchdog: {seconds:.0f} s passed, stopping; rows measured so far are in {path}", flush=True)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
