"""Training and generation speed and memory: loratune vs transformers + PEFT, side by side.

Every measurement runs in a fresh subprocess (so peak RSS is that job's alone), the two sides
alternate, each run does warm-up steps and then timed steps, and the table reports medians over
runs. Both sides train the same thing: the same random GPT-2 weights (saved once in Hugging Face
format and loaded by each), the same token batches (real reddit_tifu text where
../shared/data is present), the same AdamW hyper-parameters (lr constant, weight decay 0.01,
eps 1e-6, gradients clipped to norm 1), the same LoRA A init, and the same loss (mean
cross-entropy of the logits against the next tokens).

loratune's side runs exactly what ``loratune train`` runs: a Recipe for the job, the model from
``setup_model`` and every step through its ``TrainingSession`` (the loop's optimizer and step). So
full fine-tuning in bf16-true uses loratune's Kahan-compensated AdamW (fp32 moments, the bf16
weights' rounding carried over), while the peer uses plain torch AdamW on its bf16 model, which
loses updates below a bf16 weight's rounding step; and loratune decays matrices only (not biases
or LayerNorm), the peer every trainable tensor (the same thing for LoRA, where all are matrices).
The results JSON holds each run's per-step losses, for comparing the curves.

    python benchmarks/bench_train.py                       # the default grid (long: ~30-60 min on 2 cores)
    python benchmarks/bench_train.py --quick               # LoRA q,v + full at seq 128, GPT-2 124M
    python benchmarks/bench_train.py --cases lora-qv --precisions bf16 --seqs 128,512 --sizes 124m
    python benchmarks/bench_train.py --cases full --precisions fp32,bf16-true --steps 30 --gen ''
    python benchmarks/bench_train.py --sizes smollm2-135m --cases lora-qv --precisions fp32,bf16-true \
        --seqs 512 --batch 4 --gen 1 --gen-sizes smollm2-135m --out benchmarks/results/cpu-llama.json

Sizes ``124m`` / ``355m`` are GPT-2; ``smollm2-135m`` and ``qwen3-0.6b`` are random Llama-style
models at those real shapes with real tokenizers (``benchmarks/bench_families.py``: the
checkpoint, the peer, the FLOPs per token). ``--label NAME`` adds the command's rows to an
existing ``--out`` file (its ``runs`` then lists every contributing command), so a grid whose
sizes need different batch sizes or sequence lengths ends up in one results file. On a machine
shared with other processes, ``--threads 1 --clock cpu`` times each step by the process's CPU
time (two OpenMP threads of which one is descheduled run elementwise kernels up to ~80x slower,
and wall-clock medians then measure the neighbours); every run records both clocks
(``wall_s``, ``cpu_s``) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import bench_families as families
from common import DATA, GPT2_SIZES, ROOT, bench_cache, in_subprocess as run_in_subprocess, machine, make_checkpoint

if TYPE_CHECKING:
    from loratune.recipe import Recipe

SIZES = GPT2_SIZES
CASES = ("lora-qv", "lora-cattn", "full")


# --------------------------------------------------------------------------- shared set-up
def token_batches(ckpt: Path, batch: int, seq: int, n: int):
    """n batches of (batch, seq + 1) tokens: real reddit_tifu text if present, else seeded random ids."""
    import torch

    need = n * batch * (seq + 1)
    ids: list[int] = []
    if DATA.is_file():
        from loratune.data.tokenizer import load_tokenizer

        tok = load_tokenizer(ckpt)
        texts = [json.loads(line)["documents"] for line in DATA.read_text().splitlines()[:1000]]
        for enc in tok.encode_batch(texts):
            ids.extend(enc + [tok.eos_id])
            if len(ids) >= need:
                break
    if len(ids) < need:
        vocab = min(50257, families.shapes(families.hf_config(ckpt))["V"])
        ids.extend(torch.randint(0, vocab, (need - len(ids),), generator=torch.Generator().manual_seed(0)).tolist())
    t = torch.tensor(ids[:need]).view(n, batch, seq + 1)
    return [t[i] for i in range(n)]


# --------------------------------------------------------------------------- one job, in a subprocess
def ours_recipe(spec: dict, device) -> Recipe:
    """The loratune recipe of one job: what ``loratune train --set ...`` would be given for it. The
    schedule is constant without warm-up (the peer runs at a fixed lr too), so every timed step is
    an ordinary step of the training loop at the recipe's peak lr."""
    from loratune.recipe import load_recipe

    lora = spec["case"] != "full"
    overrides = [f"model={spec['ckpt']}", f"finetune={'lora' if lora else 'full'}", f"precision={spec['precision']}",
                 f"device={device}", f"seq_len={spec['seq']}", f"batch_size={spec['batch']}", "grad_accum=1",
                 f"max_steps={spec['warmup'] + spec['steps']}", f"lr={spec['lr']}", "weight_decay=0.01",
                 "adam_eps=1e-6", "adam_betas=0.9,0.999", "max_grad_norm=1.0", "schedule=constant",
                 "warmup_steps=0", "seed=0"]
    if lora:
        overrides += [f"lora.r={spec['r']}", f"lora.alpha={spec['alpha']}", "lora.dropout=0.0",
                      f"lora.targets={'q,v' if spec['case'] == 'lora-qv' else 'qkv'}"]
    return load_recipe(None, overrides)


def build_ours(recipe, device):
    """Our model for ``recipe`` as ``loratune train`` builds it (load, inject LoRA, set trainable, bf16 storage)."""
    from loratune.train import setup_model

    model, _, _ = setup_model(recipe, device)
    return model.to(device)


def build_peer(ckpt: Path, case: str, precision: str, r: int, alpha: float, device: str = "cpu"):
    """transformers' model + PEFT's LoRA (its own adapter layout per family), in the job's precision."""
    if families.hf_config(ckpt).get("model_type") != "gpt2":
        return families.build_family_peer(ckpt, case, precision, r, alpha, device)
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(ckpt, attn_implementation="sdpa").to(device)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if case != "full":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)  # adapters stay float32 (autocast_adapter_dtype)
    return model.to(device)


def peer_loss_function(model):
    """(x, y) -> mean token cross-entropy of the peer's logits against the next tokens."""
    import torch.nn.functional as F

    return lambda x, y: F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())


def seed_lora_A(model) -> int:
    """Give every LoRA A the same values on both sides: Kaiming-uniform (bound 1/sqrt(in), as both
    libraries draw it) from a generator seeded by the module's name and slice. PEFT's whole-c_attn
    adapter and ours then start identical (B is 0 on both), so the lora-cattn rows train exactly
    the same model; the lora-qv rows differ by design (two rank-4 slices vs one rank-4 c_attn)."""
    import zlib

    import torch

    n = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is None or not hasattr(lora_a, "items"):
                continue
            base = name.removeprefix("base_model.model.")
            for key, a in lora_a.items():
                weight = a.weight if hasattr(a, "weight") else a  # PEFT: nn.Linear under "default"
                slice_name = "all" if key == "default" else key
                gen = torch.Generator().manual_seed(zlib.crc32(f"{base}/{slice_name}".encode()))
                bound = weight.shape[1] ** -0.5
                weight.copy_((torch.rand(weight.shape, generator=gen) * 2 - 1) * bound)
                n += 1
    return n


def run_job(spec: dict) -> dict:
    """Train ``warmup + steps`` steps of one (side, case, precision, seq, size) and time them."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(spec.get("threads") or os.cpu_count())
    device = torch.device(spec.get("device", "cpu"))
    _reset_peak(device)
    params, batches, step = prepare_job(spec, device)
    times, cpu_times, losses = [], [], []
    for i, blk in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(blk)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(loss))
        if i >= spec["warmup"]:
            times.append(dt)
            cpu_times.append(dc)
    step_s = statistics.median(cpu_times if spec.get("clock") == "cpu" else times)
    return {**spec, "step_s": step_s, "tokens_per_s": spec["batch"] * spec["seq"] / step_s, "losses": losses,
            "wall_s": times, "cpu_s": cpu_times,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "trainable": sum(p.numel() for p in params), "peak_memory": _peak(device), "loadavg": os.getloadavg()[0],
            "optimizer": type(step.optimizer).__name__}


def prepare_job(spec: dict, device):
    """Model, optimizer and token batches of one job; returns (trainable params, batches, step), where
    ``step(batch)`` runs one full optimizer step and returns its loss (a float or tensor), synchronised
    with the device so it can be timed; ``step.optimizer`` is the optimizer it steps.

    loratune's step is the ``TrainingSession`` step with the job's recipe and the model from
    ``setup_model`` (so Kahan-compensated AdamW for full fine-tuning in bf16-true): exactly the step
    ``loratune train`` runs. The peer's step is the
    usual transformers + PEFT one: logits, cross-entropy, backward, clipping, torch AdamW."""
    import torch

    ckpt = Path(spec["ckpt"])
    batches = [b.to(device) for b in token_batches(ckpt, spec["batch"], spec["seq"], spec["warmup"] + spec["steps"])]
    if spec["side"] == "loratune":
        from common import lm_batch, session

        recipe = ours_recipe(spec, device)
        model = build_ours(recipe, device)
        if spec["case"] != "full":
            seed_lora_A(model)
        ours = session(model, recipe, device)

        def step(blk):
            result = ours.step(lm_batch(blk))
            _sync(device)
            return result.loss

        step.optimizer = ours.optimizer
        return ours.trainable, batches, step

    model = build_peer(ckpt, spec["case"], spec["precision"], spec["r"], spec["alpha"], str(device))
    model.train()
    if spec["case"] != "full":
        seed_lora_A(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.01, eps=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16-mixed")
    loss_fn = peer_loss_function(model)

    def step(blk):
        with autocast:
            loss = loss_fn(blk[:, :-1], blk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return loss.detach()

    step.optimizer = opt
    return params, batches, step


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int:
    """Peak memory of this job: GPU bytes allocated on CUDA (reset per job); the process's peak RSS on CPU."""
    from loratune.train.metrics import peak_memory_bytes

    return peak_memory_bytes(device)


def run_gen_job(spec: dict) -> dict:
    """Greedy decoding of ``new`` tokens after a 32-token prompt, batch ``batch``."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(spec.get("threads") or os.cpu_count())
    device = torch.device(spec.get("device", "cpu"))
    _reset_peak(device)
    ckpt = Path(spec["ckpt"])
    prompt = token_batches(ckpt, spec["batch"], 32, 1)[0][:, :32].to(device)
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    times, out = [], None
    if spec["side"] == "loratune":
        from loratune.generate import SamplingConfig, generate
        from loratune.models import load_model

        model, _ = load_model(ckpt, dtype=dtype, device=device)
        model.to(device)
        cfg = SamplingConfig(max_new_tokens=spec["new"], temperature=0.0)
        run = lambda: generate(model, prompt, cfg)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=dtype).to(device).eval()
        mask = torch.ones_like(prompt)
        eos = families.hf_config(ckpt).get("eos_token_id")
        pad = eos[0] if isinstance(eos, list) else eos
        run = lambda: model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=spec["new"],
                                     min_new_tokens=spec["new"], pad_token_id=pad)[:, 32:]
    cpu_times = []
    with torch.inference_mode():
        for i in range(spec["warmup"] + spec["steps"]):
            t0, c0 = time.perf_counter(), time.process_time()
            out = run()
            _sync(device)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
    t = statistics.median(cpu_times if spec.get("clock") == "cpu" else times)
    return {**spec, "seconds": t, "wall_s": times, "cpu_s": cpu_times, "tokens_per_s": spec["batch"] * spec["new"] / t,
            "first_tokens": out[0, :8].tolist(),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_memory": _peak(device),
            "loadavg": os.getloadavg()[0]}


def in_process(spec: dict) -> dict:
    """Run a job here (GPU runs: peak memory is the allocator's per-job peak, so no subprocess is needed)."""
    try:
        return run_gen_job(spec) if spec.get("kind") == "gen" else run_job(spec)
    except Exception as exc:  # noqa: BLE001 - one failed job is reported in its row, the grid goes on
        return {**spec, "error": f"{type(exc).__name__}: {exc}"[:300]}


def in_subprocess(spec: dict) -> dict:
    return run_in_subprocess(__file__, spec)


# --------------------------------------------------------------------------- the grid and the table
PRECISIONS = {"fp32": ["fp32"], "bf16": ["bf16-mixed", "bf16-true"], "bf16-mixed": ["bf16-mixed"],
              "bf16-true": ["bf16-true"]}
"""--precisions group -> the modes run: bf16 means each side's best bf16 mode, so both are measured."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="LoRA q,v and full, 124M, seq 128 only")
    ap.add_argument("--cases", default=",".join(CASES), help="lora-cattn is GPT-2's only (skipped for other families)")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="fp32, bf16 (= each side's best bf16 mode: both bf16-mixed and bf16-true are run), "
                    "bf16-mixed, bf16-true")
    ap.add_argument("--seqs", default="128,512,1024")
    ap.add_argument("--sizes", default="124m,355m", help="GPT-2: 124m, 355m; Llama-style: "
                    f"{', '.join(families.FAMILY_SIZES)} ('' = no training rows)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and case (alternating)")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (constant), both sides")
    ap.add_argument("--gen", default="1,8", help="generation batch sizes ('' = skip generation)")
    ap.add_argument("--gen-precisions", default="fp32,bf16")
    ap.add_argument("--gen-sizes", default="124m", help="the models generation runs on (sizes as --sizes)")
    ap.add_argument("--gen-new", type=int, default=128, help="new tokens per generation run")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps by the wall clock, or by the process's CPU time (with --threads 1 only: "
                    "tokens per CPU-second of its one thread, what a step costs when other processes share the cores)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; on cuda every job runs in this process and "
                    "memory is the allocator's per-job peak")
    ap.add_argument("--out", default="benchmarks/results/latest.json")
    ap.add_argument("--label", default=None, help="add this command's rows to --out if it exists, under this "
                    "name in its 'runs'")
    ap.add_argument("--variant", default=None, help="a name for what this command's rows measure (e.g. 'before: "
                    "SDPA attention'), shown in each row's job column, so one --out can hold before and after rows")
    args = ap.parse_args(argv)
    for group in _list(args.precisions):
        if group not in PRECISIONS:
            ap.error(f"--precisions: unknown {group!r}; use fp32, bf16, bf16-mixed or bf16-true")
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        ap.error("--clock cpu needs --threads 1 on the CPU (process time sums every thread's)")
    if args.quick:
        args.cases, args.seqs, args.sizes = "lora-qv,full", "128", "124m"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_gen_job(spec) if spec.get("kind") == "gen" else run_job(spec)))
        return
    cache = bench_cache()
    run = in_process if args.device.startswith("cuda") else in_subprocess
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    result = start_result(args, out)
    for size in _list(args.sizes):
        if families.is_family(size) and families.skip_reason(size):
            print(families.skip_reason(size), file=sys.stderr)
            continue
        train_grid(args, size, make_checkpoint(size, cache), run, result, out)
    gen_grid(args, cache, run, result, out)
    print(format_tables(result))
    chart = plot(result, out.with_suffix(".png"))
    print(f"\nraw results: {out}" + (f"; chart: {chart}" if chart else ""))


def start_result(args: argparse.Namespace, out: Path) -> dict:
    """The results dict this command fills: a new one, or with ``--label`` the existing ``out`` file's."""
    command = "python benchmarks/bench_train.py " + shlex.join(sys.argv[1:])
    this = {"command": command, "args": vars(args)}
    host = machine(args.device)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads or os.cpu_count())  # the jobs' thread count
        host["matmul"] = families.matmul_rate(clock=args.clock)
        host["cpu_flags"] = families.cpu_flags()
    if args.label is None:
        return {"format": 2, "machine": host, **this, "train": [], "generate": []}
    if out.is_file():
        result = json.loads(out.read_text())
    else:
        result = {"format": 2, "machine": host, "runs": {}, "train": [], "generate": []}
    result.setdefault("runs", {})[args.label] = {**this, "matmul": host.get("matmul"),
                                                 "loadavg_start": os.getloadavg()}
    return result


def alternate(run, base: dict, sides: tuple[str, ...], repeats: int) -> dict[str, list[dict]]:
    """``repeats`` runs of the job ``base`` per side, the sides alternating; every run's result."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, side_runs in runs.items():
            res = run({**base, "side": side})
            side_runs.append(res)
            print(_line(res), file=sys.stderr, flush=True)
    return runs


def train_grid(args: argparse.Namespace, size: str, ckpt: Path, run, result: dict, out: Path) -> None:
    """Every (seq, case, precision) of one size: ``repeats`` runs per side, alternating, one row each."""
    cfg = families.hf_config(ckpt)
    cases = [c for c in _list(args.cases) if c != "lora-cattn" or cfg.get("model_type") == "gpt2"]  # GPT-2's c_attn
    jobs = [(seq, case, group, precision) for seq in map(int, _list(args.seqs)) for case in cases
            for group in _list(args.precisions) for precision in PRECISIONS[group]]
    for seq, case, group, precision in jobs:
        base = {"case": case, "precision": precision, "seq": seq, "size": size, "batch": args.batch,
                "steps": args.steps, "warmup": args.warmup, "r": 4, "alpha": 32, "lr": args.lr, "ckpt": str(ckpt),
                "threads": args.threads, "device": args.device, "clock": args.clock}
        runs = alternate(run, base, ("loratune", "peft"), args.repeats)
        row = _summarise(runs, case, precision, seq, size, group, args.lr)
        row["batch"] = args.batch
        if args.variant:
            row["variant"] = args.variant
        row["flops_per_token"] = families.train_flops_per_token(cfg, case, seq, r=4)
        for side in runs:
            row[side]["matmul_share"] = families.roofline(row[side], row["flops_per_token"],
                                                          result["machine"].get("matmul") or {}, precision)
        result["train"].append(row)
        _save(result, out)


def gen_grid(args: argparse.Namespace, cache: Path, run, result: dict, out: Path) -> None:
    """Greedy generation of ``--gen-new`` tokens per (size, batch, precision), both sides alternating."""
    sizes = [s for s in _list(args.gen_sizes) if not (families.is_family(s) and families.skip_reason(s))]
    for size in sizes if _list(args.gen) else []:
        ckpt = make_checkpoint(size, cache)
        for b in map(int, _list(args.gen)):
            for precision in _list(args.gen_precisions):
                base = {"kind": "gen", "batch": b, "new": args.gen_new, "precision": precision, "warmup": 1,
                        "steps": 2, "ckpt": str(ckpt), "threads": args.threads, "device": args.device,
                        "clock": args.clock}
                runs = alternate(run, base, ("loratune", "transformers"), args.repeats)
                row = {"batch": b, "precision": precision, "size": size, "new_tokens": args.gen_new}
                for side, side_runs in runs.items():
                    ok = [r for r in side_runs if "error" not in r]
                    row[side] = {"tokens_per_s": _median(ok, "tokens_per_s"), "peak_memory": _median(ok, "peak_memory"),
                                 "first_tokens": next((r["first_tokens"] for r in ok), None), "runs": len(ok),
                                 "errors": [r["error"] for r in side_runs if "error" in r]}
                result["generate"].append(row)
                _save(result, out)


def _list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _save(result: dict, out: Path) -> None:
    """Write the results so far (a long grid cut short still leaves what it measured)."""
    out.write_text(json.dumps(result, indent=2) + "\n")


def _median(runs: list[dict], key: str):
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def _summarise(runs: dict, case: str, precision: str, seq: int, size: str, group: str, lr: float = 5e-5) -> dict:
    """One table row; besides the medians, each side's optimizer and every run's per-step losses
    (warm-up steps included: the curves of the trained model, the timing aside)."""
    out = {"case": case, "precision": precision, "group": group, "seq": seq, "size": size, "lr": lr}
    for side, results in runs.items():
        ok = [r for r in results if "error" not in r]
        out[side] = {"tokens_per_s": _median(ok, "tokens_per_s"), "peak_memory": _median(ok, "peak_memory"),
                     "final_loss": statistics.median(r["losses"][-1] for r in ok) if ok else None,
                     "trainable": ok[0]["trainable"] if ok else None, "runs": len(ok),
                     "errors": [r["error"] for r in results if "error" in r],
                     "optimizer": ok[0].get("optimizer") if ok else None, "losses": [r["losses"] for r in ok]}
    return out


def _line(res: dict) -> str:
    if "error" in res:
        return f"  {res['side']:>12} {res.get('case', 'gen')} {res['precision']}: ERROR {res['error']}"
    what = f"{res['case']} seq {res['seq']} {res['size']}" if "case" in res else f"generate batch {res['batch']}"
    return f"  {res['side']:>12} {what} {res['precision']}: {res['tokens_per_s']:.0f} tok/s, " \
           f"peak {res['peak_memory'] / 2**30:.2f} GiB"


def format_tables(result: dict) -> str:
    """Markdown tables: training, each mode against the peer in the same mode; each side's best bf16
    mode against the other's; generation."""
    mem = "peak GPU memory" if result["machine"].get("gpu") else "peak RSS"
    lines = [(f"| size | seq | case | mode (both sides) | loratune tok/s | peer tok/s | speed-up | loratune {mem} | "
             f"peer {mem} | memory ratio | loss after N (ours / peer) |"), "|" + "---|" * 11]
    best: dict[tuple, dict] = {}
    for row in result["train"]:
        a, b = row["loratune"], row["peft"]
        key = (row["size"], row["seq"], row["case"], row["group"])
        if not a["tokens_per_s"] or not b["tokens_per_s"]:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row['precision']} | failed: "
                         f"{'; '.join(a['errors'] + b['errors'])[:120]} |||||||")
            continue
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row['precision']} | {a['tokens_per_s']:.0f} | "
                     f"{b['tokens_per_s']:.0f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
                     f"{a['peak_memory'] / 2**30:.2f} GiB | {b['peak_memory'] / 2**30:.2f} GiB | "
                     f"{a['peak_memory'] / b['peak_memory']:.2f} | {a['final_loss']:.4f} / {b['final_loss']:.4f} |")
        for side in ("loratune", "peft"):
            s = row[side]
            if best.get(key + (side,)) is None or s["tokens_per_s"] > best[key + (side,)]["tokens_per_s"]:
                best[key + (side,)] = {**s, "precision": row["precision"]}
    pairs = [(k, best[k + ("loratune",)], best[k + ("peft",)]) for k in dict.fromkeys(k[:4] for k in best)
             if k[3] == "bf16" and k + ("loratune",) in best and k + ("peft",) in best]
    if pairs:
        lines += ["", "| size | seq | case | best bf16 mode, loratune vs peer | loratune tok/s | peer tok/s | speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for k, a, b in pairs:
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {a['precision']} vs {b['precision']} | {a['tokens_per_s']:.0f} | "
                         f"{b['tokens_per_s']:.0f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x |")
    if result["generate"]:
        lines += ["", "| greedy generation | loratune tok/s | transformers tok/s | speed-up |", "|---|---|---|---|"]
        for g in result["generate"]:
            a, b = g["loratune"]["tokens_per_s"], g["transformers"]["tokens_per_s"]
            if a and b:
                lines.append(f"| {g.get('size', '124m')}, batch {g['batch']}, {g['precision']}, "
                             f"{g.get('new_tokens', 128)} new tokens | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """Bar chart of tokens/s, loratune vs the peer, one pair of bars per measured row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, ours, peer = [], [], []
    for row in result["train"]:
        if row["loratune"]["tokens_per_s"] and row["peft"]["tokens_per_s"]:
            labels.append(f"{row['size']} s{row['seq']}\n{row['case']}\n{row['precision']}")
            ours.append(row["loratune"]["tokens_per_s"])
            peer.append(row["peft"]["tokens_per_s"])
    for g in result["generate"]:
        if g["loratune"]["tokens_per_s"] and g["transformers"]["tokens_per_s"]:
            labels.append(f"generate\nbatch {g['batch']}\n{g['precision']}")
            ours.append(g["loratune"]["tokens_per_s"])
            peer.append(g["transformers"]["tokens_per_s"])
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.5), dpi=110)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="loratune")
    ax.bar([x + 0.2 for x in xs], peer, 0.4, label="transformers + PEFT")
    for x, a, b in zip(xs, ours, peer):
        ax.text(x, max(a, b) * 1.02, f"{a / b:.1f}x", ha="center", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("tokens / second (median)")
    where = result["machine"].get("gpu") or f"{result['machine']['cores']} CPU cores"
    ax.set_title(f"{where}, torch {result['machine']['torch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
