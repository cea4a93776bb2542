"""Peak memory and speed of one LoRA training step on a ~1B Llama shape: loratune vs transformers + PEFT
(+ bitsandbytes for QLoRA), side by side, each job in a fresh subprocess.

The model is Llama-3.2-1B's shape (loratune's ``llama3.2-1b`` preset: 1.24 B parameters, 16 layers,
hidden 2048, 128,256-token vocabulary, tied head) with random weights, written once as a bf16
Hugging Face checkpoint (as the hub ships it) and loaded by both sides. Every job trains LoRA on q
and v (r 16, alpha 32) with AdamW, batch 1 x seq 512 of real reddit_tifu text (Llama 3.1's real
tokenizer where ../shared is present, else random ids), and reports:

* the step's peak memory: the process's peak RSS over the timed steps, after the peak counter is
  reset once the model and optimizer are built (``/proc/self/clear_refs``); loading transients are
  excluded on both sides alike (the setup's own peak is recorded as ``setup_peak``);
* tokens/s (median over the timed steps, after a warm-up step) and the share of this machine's
  matmul rate that the model FLOPs per token amount to.

Cases: ``lora`` (the frozen base in the run's precision), ``qlora`` (the base in 4-bit NF4, block 64,
double quantization), ``qlora-ckpt`` (plus activation checkpointing; loratune's loss is always the
chunked fused head + cross-entropy). The peer's QLoRA is transformers' ``BitsAndBytesConfig``
(nf4, double quant, compute dtype = the run's) with PEFT on top, checkpointed with
``gradient_checkpointing_enable(use_reentrant=False)``; its non-quantized weights keep the run's
dtype (``prepare_model_for_kbit_training`` would widen them to fp32). loratune pins glibc's mmap
threshold for runs that save memory (loratune/train/allocator.py); the peer gets the same through
``MALLOC_MMAP_THRESHOLD_`` in one more qlora-ckpt row, so the table separates that gain from the rest.

    python benchmarks/bench_qlora.py                      # fp32 and bf16, every case (~30 min on 2 cores)
    python benchmarks/bench_qlora.py --precisions bf16 --cases lora,qlora-ckpt --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_families as families
import common

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "reddit_tifu_long" / "train.jsonl"
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama3_1"
CASES = ("lora", "qlora", "qlora-ckpt")
UNFUSED = "loratune, unfused (before)"
SIDES = ("loratune", UNFUSED, "transformers+peft", "transformers+peft, mmap 1 MiB")
"""``UNFUSED`` is loratune with its fused NF4 product switched off (``loratune.quant.linear.FUSED_CPU``):
each weight dequantized whole, then multiplied, as before the fused path; run for the QLoRA cases only.
The last is the peer with glibc's mmap threshold pinned at 1 MiB through the environment, as loratune
pins it for runs that save memory (loratune/train/allocator.py): run for the qlora-ckpt case only."""
PINNED = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
R, ALPHA = 16, 32.0


def make_llama_checkpoint(cache: Path, layers: int = 16) -> Path:
    """Random Llama-3.2-1B-shaped weights as a bf16 Hugging Face checkpoint (made once per cache); fewer
    ``layers`` than its 16 for profiling."""
    out = cache / ("llama3.2-1b-random-bf16" + ("" if layers == 16 else f"-{layers}layers"))
    if (out / "config.json").exists():
        return out
    import torch

    from loratune.hub.export import save_hf_model
    from loratune.models.registry import FAMILIES

    family = FAMILIES["llama"]
    config = family.config_from_hf({"model_type": "llama", **family.presets["llama3.2-1b"], "num_hidden_layers": layers})
    with torch.device("meta"):
        model = family.build(config)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.model.embed_tokens.weight
    model.init_weights(seed=0)
    save_hf_model(model, out, tokenizer_dir=TOKENIZER if TOKENIZER.is_dir() else None, dtype=torch.bfloat16,
                  max_shard_size="1GB")
    return out


def token_batch(seq: int, vocab: int):
    """(1, seq + 1) token ids: reddit_tifu text through Llama 3.1's tokenizer, else seeded random ids."""
    import torch

    if DATA.is_file() and (TOKENIZER / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
        ids: list[int] = []
        for line in DATA.read_text(encoding="utf-8").splitlines():
            ids += tok.encode(json.loads(line)["documents"]).ids
            if len(ids) > seq:
                ids = ids[:seq + 1]
                if max(ids) < vocab:  # else a cut-down vocabulary (a profiling model): random ids below
                    return torch.tensor(ids)[None]
                break
    return torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(0))


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def build_ours(spec: dict):
    import torch

    from loratune.quant import linear
    from loratune.recipe import load_recipe
    from loratune.train import setup_model

    linear.FUSED_CPU = spec["side"] != UNFUSED

    overrides = [f"model={spec['ckpt']}", "finetune=lora", f"precision={spec['precision_name']}", "device=cpu",
                 f"seq_len={spec['seq']}", "batch_size=1", "lr=1e-4", "max_grad_norm=1.0", "schedule=constant",
                 f"lora.r={R}", f"lora.alpha={ALPHA}", "lora.targets=q,v", "seed=0",
                 f"quantize={'nf4' if spec['case'] != 'lora' else 'none'}",
                 f"activation_checkpointing={str(spec['case'] == 'qlora-ckpt').lower()}"]
    recipe = load_recipe(None, overrides)
    model, _, _ = setup_model(recipe, torch.device("cpu"))
    session = common.session(model, recipe)  # in training mode, as the loop runs it (checkpointing, dropout)

    def step(ids):
        session.step(common.lm_batch(ids))
    return step, model.config.vocab_size


def build_peer(spec: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if spec["case"] != "lora":
        kwargs.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype), device_map="cpu")
    model = AutoModelForCausalLM.from_pretrained(spec["ckpt"], **kwargs)
    model.config.use_cache = False
    if spec["case"] == "qlora-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, eps=1e-6)

    def step(ids):
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1].clone()).loss  # transformers shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, model.config.vocab_size


def worker(spec: dict) -> dict:
    import torch

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    step, vocab = (build_ours if spec["side"].startswith("loratune") else build_peer)(spec)
    ids = token_batch(spec["seq"], vocab)
    resident, setup_peak = rss("VmRSS"), rss("VmHWM")
    reset_ok = reset_peak()  # (ru_maxrss is reset with it: the loading peak is setup_peak)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        step(ids)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    if spec.get("profile"):  # one more step under torch.profiler: where the time goes, by operator
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(ids)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:spec["profile"]]
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
        return {"profile_total_self_cpu_s": total, "profile": [
            {"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6} for e in ops]}
    return {"resident_before_steps": resident, "loadavg": os.getloadavg()[0], "step_peak": rss("VmHWM") if reset_ok else None,
            "setup_peak": setup_peak,
            "step_s": times, "tokens_per_s": spec["seq"] / statistics.median(times)}


def run_job(spec: dict, timeout: int) -> dict:
    env = {**os.environ, **(PINNED if "mmap" in spec["side"] else {})}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--sides", default=";".join(SIDES), help="';'-separated")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per job (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16: the 1B shape; fewer for --profile)")
    ap.add_argument("--profile", type=int, default=0, help="N > 0: instead of timing, profile one step after the "
                    "timed ones and keep the N operators of most self CPU time (write to another --out)")
    ap.add_argument("--cache", default=os.environ.get("LORATUNE_BENCH_CACHE", "/tmp/loratune-bench"))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    ap.add_argument("--out", default="benchmarks/results/qlora.json")
    ap.add_argument("--append", action="store_true", help="add the rows to --out's (same shape and seq), so that "
                    "one results file can be measured in several shorter runs")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    ckpt = make_llama_checkpoint(Path(args.cache), args.layers)
    cfg = families.hf_config(ckpt)
    result = {"format": "qlora", "command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
              "machine": {"cpu": families.cpu_name() or platform.machine(), "cores": os.cpu_count(),
                          "amx_bf16": "amx_bf16" in families.cpu_flags(), "matmul": families.matmul_rate()},
              "model": {"shape": "llama3.2-1b", "layers": args.layers, "matmul_params": families.matmul_params(cfg),
                        "seq": args.seq, "batch": 1,
                        "r": R, "alpha": ALPHA, "targets": "q,v"},
              "flops_per_token": families.train_flops_per_token(cfg, "lora-qv", args.seq, R), "rows": []}
    if args.append and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if old.get("model", {}).get("seq") != args.seq:
            raise SystemExit(f"--append: {args.out} holds seq {old.get('model', {}).get('seq')}, not {args.seq}")
        old["commands"] = [*old.get("commands", [old["command"]]), result["command"]]
        old["command"] = " && ".join(old["commands"])
        result = old
    for precision in args.precisions.split(","):
        for case in args.cases.split(","):
            for side in args.sides.split(";"):
                if ("mmap" in side and case != "qlora-ckpt") or (side == UNFUSED and case == "lora"):
                    continue
                spec = {"side": side, "case": case, "precision": precision, "ckpt": str(ckpt), "seq": args.seq,
                        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "profile": args.profile,
                        "precision_name": "bf16-true" if precision == "bf16" else "fp32"}
                t0 = time.time()
                row = ({k: spec[k] for k in ("side", "case", "precision")} | {"loadavg_before": os.getloadavg()[0]}
                       | run_job(spec, args.timeout))
                row["runs"], row["job_s"] = 1, round(time.time() - t0, 1)
                result["rows"].append(row)
                peak = row.get("step_peak")
                if args.profile:
                    print(json.dumps(row, indent=1), flush=True)
                print(f"{precision} {case:10s} {side:32s} "
                      + (f"step peak {peak / 2**30:.2f} GiB, {row['tokens_per_s']:.1f} tok/s" if peak else
                         str(row.get("error"))), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
