"""Preference and RL fine-tuning on CPU, side by side with the peers in one run: DPO steps/s against TRL's
DPOTrainer with PEFT, and GRPO's rollouts by loratune's engine against transformers' ``generate`` (what TRL's
GRPOTrainer samples with when vLLM is off), for the same group sizes.

    python benchmarks/bench_preference.py --out benchmarks/results/preference.json

The model is the random SmolLM2-135M-shaped checkpoint of ``bench_families.py`` (the published shape, with
Llama 2's real tokenizer), loaded by both sides, LoRA r=16 on q and v, fp32.

- ``dpo``: prompt/chosen/rejected pairs of real reddit_tifu text (the first ``--prompt-words`` words of a post,
  its TL;DR chosen, the next post's TL;DR rejected), in TRL's standard text format, tokenized by each side
  (TRL's rules; both cut a sequence at ``--seq`` + 1 tokens). ``--pairs`` pairs a step, sigmoid loss, beta 0.1,
  reference = the adapter switched off, computed in each step's pass on both sides. Each side's job runs in a
  fresh process; one warm-up step, then the median of ``--steps`` timed optimizer steps (TRL: its Trainer's
  whole step, timed by a callback from step begin to step end).
- ``rollouts``: ``--prompts`` prompts of 32 real tokens, ``G`` completions each of exactly ``--new`` tokens
  (stops off on both sides), temperature 1; ours: one :class:`~loratune.generate.engine.Engine` over the
  LoRA model (the adapter being trained, not a copy), all prompts x G requests submitted at once; the peer:
  ``model.generate(..., do_sample=True, num_return_sequences=G)`` on the PEFT model. One warm-up, median of
  ``--repeats``.

Shares of the matmul rate: DPO counts 6 N FLOPs per token of a pair's two rows (forward 2N and the input
gradients 2N of the policy, 2N for the reference forward; N = the matmul weights of one token's forward) and
generation 2N per new token; both against this machine's measured fp32 rate. Single runs, marked so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_families as families
from common import DATA, ROOT, bench_cache, in_subprocess, machine, make_checkpoint

SIZE = "smollm2-135m"
R, ALPHA = 16, 32


def pair_records(n: int, words: int) -> list[dict]:
    """TRL standard-format pairs from reddit_tifu (seeded fallback text where ../shared is absent)."""
    if DATA.is_file():
        rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n + 1]]
    else:
        rows = [{"documents": f"post {i} " * 60, "tldr": f"summary {i}"} for i in range(n + 1)]
    return [{"prompt": " ".join(r["documents"].split()[:words]) + "\nTL;DR:", "chosen": " " + r["tldr"].strip(),
             "rejected": " " + rows[i + 1]["tldr"].strip()} for i, r in enumerate(rows[:n])]


# --------------------------------------------------------------------------- jobs (each in a fresh process)
def dpo_ours(spec: dict) -> dict:
    import torch

    from loratune.recipe import load_recipe
    from loratune.train.session import TrainingSession, resolve_device

    data = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_records(spec["pairs"] * (spec["steps"] + 1),
                                                                        spec["prompt_words"])))
    recipe = load_recipe(None, [f"model={spec['ckpt']}", f"data.source={data}", "data.val_fraction=0",
                                "objective=dpo", f"seq_len={spec['seq']}", f"batch_size={spec['pairs']}",
                                f"max_steps={spec['steps'] + 1}", "precision=fp32", "device=cpu", "lr=1e-4",
                                f"lora.r={R}", f"lora.alpha={ALPHA}", "lora.dropout=0", "lora.targets=[q,v]",
                                "weight_decay=0"])
    recipe, _ = resolve_device(recipe)
    torch.manual_seed(0)
    session = TrainingSession.from_recipe(recipe, validation=False)
    times, tokens = [], []
    for i in range(spec["steps"] + 1):
        batch = session.next_batch()
        t0 = time.perf_counter()
        result = session.step(batch)
        if i:
            times.append(time.perf_counter() - t0)
            tokens.append(real_tokens(batch["labels"]))
    return {"s_per_step": statistics.median(times), "loss": result.loss, "tokens_per_step": statistics.mean(tokens),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def real_tokens(labels) -> int:
    """The tokens of a step's rows without their padding: a row ends with its completion, so its real length is
    one past its last scored label (labels are shifted: + 1 for the first token, read but not predicted)."""
    flat = labels.reshape(-1, labels.shape[-1])
    scored = (flat != -100).int()
    last = scored.shape[-1] - 1 - scored.flip(-1).argmax(-1)
    return int(((last + 2) * scored.any(-1)).sum())


def dpo_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["ckpt"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["ckpt"], dtype=torch.float32, attn_implementation="sdpa")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    out = tempfile.mkdtemp()
    args = DPOConfig(output_dir=out, per_device_train_batch_size=spec["pairs"], max_steps=spec["steps"] + 1,
                     learning_rate=1e-4, weight_decay=0.0, max_length=spec["seq"] + 1, beta=0.1, report_to=[],
                     use_cpu=True, logging_steps=1, save_strategy="no", dataloader_num_workers=0, bf16=False,
                     lr_scheduler_type="constant", seed=0)
    trainer = DPOTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(pair_records(spec["pairs"] * (spec["steps"] + 1),
                                                                      spec["prompt_words"])),
                         peft_config=LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"s_per_step": statistics.median(times[1:]), "loss": losses[-1] if losses else None,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _prompts(ckpt: str, n: int):
    import torch

    from bench_train import token_batches

    return token_batches(Path(ckpt), n, 32, 1)[0][:, :32].to(torch.long)


def rollouts_ours(spec: dict) -> dict:
    import torch

    from loratune.adapters.lora import LoRAConfig, lora_layers
    from loratune.adapters.targets import inject_lora
    from loratune.generate.engine import Engine, Request
    from loratune.generate.sampling import SamplingConfig
    from loratune.models import load_model

    torch.manual_seed(0)
    model, _ = load_model(spec["ckpt"], dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, LoRAConfig(r=R, alpha=ALPHA, targets=["q", "v"]))
    for _, layer in lora_layers(model):  # an adapter mid-training: B is not zero
        for p in layer.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.01)
    prompts = _prompts(spec["ckpt"], spec["prompts"]).tolist()
    G, new = spec["group"], spec["new"]
    engine = Engine(model, max_batch=len(prompts) * G, max_len=32 + new, prefill_tokens=32 * len(prompts) * G)

    def run(seed: int) -> None:
        for i, p in enumerate(prompts):
            for g in range(G):
                engine.submit(Request(p, sampling=SamplingConfig(max_new_tokens=new, temperature=1.0,
                                                                 seed=seed * 10_000 + i * G + g)))
        while engine.busy():
            engine.step()

    return _timed(run, spec, len(prompts) * G * new)


def rollouts_peer(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["ckpt"], dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.01)
    model.eval()
    ids = _prompts(spec["ckpt"], spec["prompts"])
    G, new = spec["group"], spec["new"]

    def run(seed: int) -> None:
        torch.manual_seed(seed)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, num_return_sequences=G, max_new_tokens=new, min_new_tokens=new,
                           pad_token_id=0)

    return _timed(run, spec, len(ids) * G * new)


def _timed(run, spec: dict, new_tokens: int) -> dict:
    run(0)  # warm-up
    times = []
    for i in range(spec["repeats"]):
        t0 = time.perf_counter()
        run(i + 1)
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"s_per_rollout": s, "tokens_per_s": new_tokens / s, "new_tokens": new_tokens,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


JOBS = {"dpo-ours": dpo_ours, "dpo-trl": dpo_trl, "rollouts-ours": rollouts_ours, "rollouts-peer": rollouts_peer}


def worker(payload: str) -> None:
    spec = json.loads(payload)
    import torch

    torch.set_num_threads(spec["threads"])
    result = JOBS[spec["job"]](spec)
    print(json.dumps({**spec, **result, "loadavg": os.getloadavg()}))


# --------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "preference.json"))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--groups", default="4,8")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    ckpt = str(make_checkpoint(SIZE, bench_cache()))
    n = families.matmul_params(families.hf_config(Path(ckpt)))
    command = "python benchmarks/bench_preference.py " + " ".join(a for a in (argv or sys.argv[1:]) if a)
    result = {"format": "preference", "command": command.strip(),
              "machine": {**machine(), "matmul": families.matmul_rate(), "amx": families.cpu_flags()},
              "shape": SIZE, "matmul_params": n, "lora": {"r": R, "alpha": ALPHA, "targets": ["q", "v"]},
              "rows": []}
    base = {"ckpt": ckpt, "threads": args.threads}
    for job in ("dpo-ours", "dpo-trl"):
        spec = {**base, "job": job, "pairs": args.pairs, "seq": args.seq, "steps": args.steps,
                "prompt_words": args.prompt_words}
        print(f"{job} ...", file=sys.stderr, flush=True)
        result["rows"].append(in_subprocess(__file__, spec))
    for g in (int(x) for x in args.groups.split(",")):
        for job in ("rollouts-ours", "rollouts-peer"):
            spec = {**base, "job": job, "group": g, "prompts": args.prompts, "new": args.new,
                    "repeats": args.repeats}
            print(f"{job} G={g} ...", file=sys.stderr, flush=True)
            result["rows"].append(in_subprocess(__file__, spec))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
