"""What packing whole examples buys over padding: real tokens per second and epoch time on reddit_tifu.

The data is ../shared/data/reddit_tifu_long/train.jsonl (1,000 posts) as the completion task
(``{documents}\\nTL;DR: `` -> ``{tldr}``, only the TL;DR trained), tokenized by GPT-2's real
tokenizer through :func:`loratune.data.tasks.build_examples`. Two arms train the same examples
with the same number of rows per step:

- padded (``packing=False``): one example per row, each batch right-padded to its longest row;
- packed (``packing=True``): whole examples packed best-fit into rows of at most seq_len + 1 tokens
  (:func:`loratune.data.packing.pack_examples`), positions restarting at each example and
  attention block-diagonal, so each example trains as it would alone.

The benchmark asserts that the two arms hold the same multiset of (input_ids, labels) examples
(the packed rows cut back at their ``segments``). The model is a random GPT-2 124M
(``common.make_checkpoint``), LoRA q,v r=4 alpha=32, built and stepped exactly as
``loratune train`` does (``bench_train.ours_recipe`` / ``build_ours``, then its
:class:`~loratune.train.session.TrainingSession`'s step), in bf16-true (what ``precision=auto`` picks on a CPU
with AMX) and fp32. Each arm starts from a fresh model and runs ``--warmup`` steps, then ``--steps``
timed steps, on batches of epoch 0 (seed 0 shuffle, as the training loop's); the two arms live in
one process and their steps alternate (padded, packed, packed, padded, ...), so that both see the
same neighbours on a shared machine (each step also records the CPU seconds other processes used
meanwhile, from /proc/stat).

Counted per batch: positions (rows x T, padding included: what the model's body computes), real
positions (input tokens that are not padding), trained positions (labels != -100), and head
positions (those in the loss's chunks that hold a trained label: loratune computes the output
head only there, so its cost follows the number of completions per step, not the padding). The
timed batches are a stratified sample of the epoch's: ``--steps`` batches at evenly spaced
quantiles of their real tokens, so that a few steps see the epoch's mix of short and long
batches (the padded arm's padding share per batch runs from 0 to 48% at seq 512); the warm-up
steps are the epoch's first other batches. Rates are sums over the timed steps divided by their summed
time: process CPU time with ``--threads 1`` (the ``--clock cpu --threads 1`` convention of
bench_train.py: the machine is shared, and one thread's CPU time is what a step costs it), wall
time recorded too. Steps per epoch are ceil(rows / batch), what it takes to see every example
once; padding shares and epoch totals come from every batch of that epoch. The epoch time is the
epoch's real tokens / real tokens per second (the JSON also holds the estimates from positions
per second and from the mean step time). The share of the matmul rate is
``bench_families.roofline`` of the positions computed (and of the real tokens) per second, against
``bench_families.matmul_rate`` measured on one thread by the same clock before and after the jobs
(each precision's best of the two is kept; both are in the JSON).

    python benchmarks/bench_packing.py                        # bf16-true at seq 512, one run (~2 min)
    python benchmarks/bench_packing.py --jobs 512:bf16-true,1024:bf16-true,512:fp32 --repeats 3 --warmup 1 --steps 3

The second is what benchmarks/results/packing.json holds (10-16 min on the 2-core machine, whose
speed varied up to 2x within minutes: the same step's CPU time doubled with no other process busy,
hence the interleaved arms and the per-run ratios that the table shows).

Results go to benchmarks/results/packing.json (``--out``); ``benchmarks/report_tables.py``
renders them. Check that no test suite runs first (``pgrep -f pytest``): it shares the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import bench_families as families
import bench_train as bt
import common

ROOT = Path(__file__).resolve().parents[1]
PROMPT, COMPLETION = "{documents}\nTL;DR: ", "{tldr}"
ARMS = ("padded", "packed")


def load_arms(ckpt: Path, seq: int) -> dict:
    """{arm: examples} of the reddit posts at ``seq``, after checking both arms train the same examples."""
    from loratune.data.config import DataConfig
    from loratune.data.tasks import build_examples
    from loratune.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    records = [json.loads(line) for line in common.DATA.read_text().splitlines() if line.strip()]
    arms = {}
    for arm in ARMS:
        cfg = DataConfig(task="completion", prompt_template=PROMPT, completion_template=COMPLETION,
                         packing=arm == "packed")
        arms[arm] = build_examples(records, cfg, tok, seq, source=str(common.DATA))
    check_same_examples(arms["padded"], arms["packed"], seq)
    return {"examples": arms, "records": len(records), "pad_id": tok.pad_id}


def unpack(rows: list) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every (input_ids, labels) example of packed rows, cut at their segments."""
    out = []
    for row in rows:
        start = 0
        for n in row.segments or [len(row.input_ids)]:
            out.append((tuple(row.input_ids[start:start + n]), tuple(row.labels[start:start + n])))
            start += n
        assert start == len(row.input_ids) == len(row.labels), "segments do not cover the row"
    return out


def check_same_examples(padded: list, packed: list, seq: int) -> None:
    """The packed rows hold exactly the padded arm's examples (as a multiset), and fit seq + 1."""
    assert all(e.segments is None for e in padded), "the padded arm has packed rows"
    assert all(len(e.input_ids) <= seq + 1 for e in padded + packed), "a row is longer than seq_len + 1"
    assert Counter(unpack(padded)) == Counter(unpack(packed)), "packed and padded arms train different examples"


def batch_counts(batches, index: int, chunk: int) -> tuple[dict, dict]:
    """Batch ``index`` of epoch 0 and its counts: positions (rows x T), real (not padding), trained, and
    head (positions in the loss's chunks of ``chunk`` that hold a trained label: the only ones whose
    output-head logits are computed, see ``loratune.train.loss``)."""
    batch = batches.batch(0, index)
    start = index * batches.batch_size
    picked = [batches.examples[i] for i in batches.order(0)[start:start + batches.batch_size]]
    trained = (batch["labels"] != -100).flatten()
    head = sum(len(part) for part in trained.split(chunk) if bool(part.any()))
    counts = {"positions": batch["input_ids"].numel(), "real": sum(len(e.input_ids) - 1 for e in picked),
              "trained": int(trained.sum()), "head": head}
    return batch, counts


def plan_epoch(batches, chunk: int, warmup: int, steps: int) -> dict:
    """Counts of every batch of epoch 0 (the last partial: every example seen once), their sums, and which
    batches to time: ``steps`` of them at evenly spaced quantiles of their real tokens (a stratified sample,
    so the timed steps' padding is close to the epoch's), warmed up by the first ``warmup`` others of the epoch."""
    per_batch = [batch_counts(batches, i, chunk)[1] for i in range(len(batches))]
    assert len(per_batch) >= warmup + steps, "too few batches for the warm-up and timed steps"
    by_real = sorted(range(len(per_batch)), key=lambda i: (per_batch[i]["real"], i))
    timed = [by_real[int((k + 0.5) * len(by_real) / steps)] for k in range(steps)]
    others = [i for i in range(len(per_batch)) if i not in timed]
    total = Counter()
    for counts in per_batch:
        total.update(counts)
    return {"epoch": dict(total), "warmup": others[:warmup], "timed": timed, "steps_per_epoch": len(per_batch)}


def setup_arm(spec: dict, examples: list, pad_id: int) -> dict:
    """A fresh model, optimizer and batches of one arm, built as ``loratune train`` builds them."""
    import torch

    from loratune.data.batches import Batches
    from loratune.train.loss import default_chunk

    torch.manual_seed(0)
    device = torch.device("cpu")
    recipe = bt.ours_recipe(spec, device)
    model = bt.build_ours(recipe, device)
    bt.seed_lora_A(model)
    chunk = default_chunk(device, model.lm_head.weight.shape[0])
    batches = Batches(examples, spec["batch"], seed=0, shuffle=True, pad_id=pad_id, drop_last=False)
    return {"session": common.session(model, recipe, device), "batches": batches, "chunk": chunk,
            "plan": plan_epoch(batches, chunk, spec["warmup"], spec["steps"]), "rows": len(examples),
            "timed": Counter(), "cpu_s": [], "wall_s": [], "losses": [], "others_s": []}


def run_step(arm: dict, index: int, timed: bool) -> None:
    """One training step of the arm on its batch ``index``; timed: its counts and times are recorded, and
    the CPU seconds that other processes used meanwhile (from /proc/stat: the machine's noise)."""
    batch, counts = batch_counts(arm["batches"], index, arm["chunk"])
    busy0, t0, c0 = _busy_s(), time.perf_counter(), time.process_time()
    result = arm["session"].step(batch)
    dt, dc, busy = time.perf_counter() - t0, time.process_time() - c0, _busy_s() - busy0
    arm["losses"].append(result.loss)
    if timed:
        arm["timed"].update(counts)
        arm["cpu_s"].append(dc)
        arm["wall_s"].append(dt)
        arm["others_s"].append(max(0.0, busy - dc) if busy is not None else None)


def _busy_s() -> float | None:
    """CPU seconds all processes have used since boot (user + nice + system), or None off Linux."""
    try:
        ticks = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]
    except OSError:
        return None
    return sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK")


def time_pair(spec: dict, data: dict) -> dict:
    """Both arms on fresh models, their steps interleaved (padded, packed, then packed, padded, ...), so
    that the two see the same neighbours on a shared machine: {arm: the timed steps' counts and times}."""
    arms = {arm: setup_arm(spec, data["examples"][arm], data["pad_id"]) for arm in ARMS}
    for k in range(spec["warmup"]):
        for arm in arms.values():
            run_step(arm, arm["plan"]["warmup"][k], timed=False)
    for k in range(spec["steps"]):
        for name in ARMS if k % 2 == 0 else ARMS[::-1]:
            run_step(arms[name], arms[name]["plan"]["timed"][k], timed=True)
    out = {}
    for name, arm in arms.items():
        plan = arm["plan"]
        out[name] = {"timed": dict(arm["timed"]), "cpu_s": arm["cpu_s"], "wall_s": arm["wall_s"],
                     "others_s": arm["others_s"], "losses": arm["losses"], "batches": plan["timed"],
                     "trainable": sum(p.numel() for p in arm["params"]), "rows": arm["rows"], "epoch": plan["epoch"],
                     "steps_per_epoch": plan["steps_per_epoch"], "head_chunk": arm["chunk"],
                     "loadavg": os.getloadavg()[0]}
    return out


def summarise(run: dict, clock: str) -> dict:
    """Rates of one run: per second of its clock (``cpu`` or ``wall``) over the timed steps, and the epoch estimate."""
    seconds = sum(run["cpu_s"] if clock == "cpu" else run["wall_s"])
    timed, epoch = run["timed"], run["epoch"]
    real_per_s, positions_per_s = timed["real"] / seconds, timed["positions"] / seconds
    return {"real_tokens_per_s": real_per_s, "trained_tokens_per_s": timed["trained"] / seconds,
            "positions_per_s": positions_per_s, "epoch_s": epoch["real"] / real_per_s,
            "epoch_s_by_positions": epoch["positions"] / positions_per_s,
            "epoch_s_by_steps": run["steps_per_epoch"] * seconds / len(run["cpu_s"]),
            "wall_real_tokens_per_s": timed["real"] / sum(run["wall_s"])}


def arm_row(spec: dict, arm: str, runs: list[dict], rates: dict, flops: float) -> dict:
    """One table row: an arm at (precision, seq), its counts, and the median over runs of each rate."""
    first, n = runs[0], len(runs)
    stats = [summarise(r, spec["clock"]) for r in runs]
    row = {"arm": arm, "precision": spec["precision"], "seq": spec["seq"], "batch": spec["batch"],
           "size": spec["size"], "rows": first["rows"], "steps_per_epoch": first["steps_per_epoch"],
           "warmup": spec["warmup"], "steps": spec["steps"], "runs": n, "single_run": n == 1,
           "timed": first["timed"], "epoch": first["epoch"],
           "pad_share_timed": 1 - first["timed"]["real"] / first["timed"]["positions"],
           "pad_share_epoch": 1 - first["epoch"]["real"] / first["epoch"]["positions"],
           "trainable": first["trainable"], "flops_per_position": flops}
    for key in stats[0]:
        row[key] = statistics.median(s[key] for s in stats)
    row["mean_T"] = first["timed"]["positions"] / (spec["steps"] * spec["batch"])
    set_shares(row, rates)
    row["head_chunk"] = first["head_chunk"]
    row["per_run"] = [{**st, "batches": r["batches"], "cpu_s": r["cpu_s"], "wall_s": r["wall_s"],
                       "others_s": r["others_s"], "losses": r["losses"], "loadavg": r["loadavg"]}
                      for r, st in zip(runs, stats)]
    return row


def set_shares(row: dict, rates: dict) -> None:
    """The row's share of the matmul rate (bench_families.roofline): all positions computed, and real tokens only."""
    for key, rate in (("matmul_share", "positions_per_s"), ("useful_matmul_share", "real_tokens_per_s")):
        row[key] = families.roofline({"tokens_per_s": row[rate]}, row["flops_per_position"], rates, row["precision"])


def best_matmul_rate(result: dict, clock: str) -> None:
    """Measure the matmul rate again after the jobs and keep each precision's best of the two (the
    machine's peak, less what neighbours took), then recompute the rows' shares of it."""
    runs = [result["machine"]["matmul"], families.matmul_rate(clock=clock)]
    best = {**runs[0], **{k: max(r[k] for r in runs) for k in ("fp32_gflops", "bf16_gflops")}}
    result["machine"].update(matmul=best, matmul_runs=runs)
    for row in result["rows"]:
        set_shares(row, best)


def comparison(padded: dict, packed: dict) -> dict:
    """packed / padded at one (precision, seq), and where the gain comes from. The rate ratios are the
    median over runs of each run's ratio (a run's two arms were interleaved, so they shared its noise)."""
    runs = list(zip(padded["per_run"], packed["per_run"]))
    ratios = {key: [b[key] / a[key] for a, b in runs] for key in ("real_tokens_per_s", "epoch_s", "positions_per_s")}
    return {"precision": padded["precision"], "seq": padded["seq"],
            "real_tokens_per_s": statistics.median(ratios["real_tokens_per_s"]),
            "epoch_time": statistics.median(ratios["epoch_s"]),
            "positions_per_s": statistics.median(ratios["positions_per_s"]),
            "runs_real_tokens_per_s": ratios["real_tokens_per_s"],
            "epoch_positions": packed["epoch"]["positions"] / padded["epoch"]["positions"],
            "head_per_position": (packed["epoch"]["head"] / packed["epoch"]["positions"])
            / (padded["epoch"]["head"] / padded["epoch"]["positions"]),
            "pad_share_epoch": [padded["pad_share_epoch"], packed["pad_share_epoch"]],
            "mean_T": [padded["mean_T"], packed["mean_T"]],
            "real_per_step": (packed["epoch"]["real"] / packed["steps_per_epoch"])
            / (padded["epoch"]["real"] / padded["steps_per_epoch"])}


def run_grid(args: argparse.Namespace, ckpt: Path, result: dict, out: Path) -> None:
    """Every (seq, precision) job: ``repeats`` runs per arm, the arms alternating; a row per arm and a comparison."""
    cfg = families.hf_config(ckpt)
    jobs = [(int(job.split(":")[0]), job.split(":")[1]) for job in bt._list(args.jobs)]
    for seq in dict.fromkeys(seq for seq, _ in jobs):
        data = load_arms(ckpt, seq)
        result["data"].setdefault("examples", len(data["examples"]["padded"]))
        result["data"]["records"] = data["records"]
        flops = families.train_flops_per_token(cfg, "lora-qv", seq, r=4)
        for precision in [p for q, p in jobs if q == seq]:
            spec = {"case": "lora-qv", "precision": precision, "seq": seq, "size": "124m", "batch": args.batch,
                    "steps": args.steps, "warmup": args.warmup, "r": 4, "alpha": 32, "lr": args.lr,
                    "ckpt": str(ckpt), "clock": args.clock}
            runs = {arm: [] for arm in ARMS}
            for _ in range(args.repeats):
                pair = time_pair(spec, data)
                for arm in ARMS:
                    runs[arm].append(pair[arm])
                    print(_line(spec, arm, pair[arm]), file=sys.stderr, flush=True)
            rows = {arm: arm_row(spec, arm, runs[arm], result["machine"]["matmul"], flops) for arm in ARMS}
            result["rows"] += [rows[arm] for arm in ARMS]
            result["comparisons"].append(comparison(rows["padded"], rows["packed"]))
            out.write_text(json.dumps(result, indent=2) + "\n")


def _line(spec: dict, arm: str, run: dict) -> str:
    s = summarise(run, spec["clock"])
    return (f"  {arm:>6} seq {spec['seq']} {spec['precision']}: {s['real_tokens_per_s']:.0f} real tok/s, "
            f"{s['positions_per_s']:.0f} positions/s, epoch ~{s['epoch_s']:.0f} s (cpu {sum(run['cpu_s']):.1f} s, "
            f"wall {sum(run['wall_s']):.1f} s, others' CPU {sum(x or 0 for x in run['others_s']):.1f} s)")


def start_result(args: argparse.Namespace) -> dict:
    """The results skeleton: machine (CPU, flags, matmul rate at the jobs' thread count and clock), command, data."""
    import torch

    from loratune.train.precision import choose_precision

    torch.set_num_threads(args.threads)
    machine = common.machine("cpu")
    machine.update(cpu_flags=families.cpu_flags(), matmul=families.matmul_rate(clock=args.clock),
                   auto_precision=choose_precision(torch.device("cpu"))[0])
    command = "python benchmarks/bench_packing.py " + shlex.join(sys.argv[1:])
    data = {"source": os.path.relpath(common.DATA, ROOT), "task": "completion", "prompt_template": PROMPT,
            "completion_template": COMPLETION}
    model = {"size": "124m", "family": "gpt2 (random weights, real tokenizer)", "finetune": "lora", "targets": "q,v",
             "r": 4, "alpha": 32, "lr": args.lr}
    return {"format": "packing", "machine": machine, "command": command.strip(), "args": vars(args),
            "clock": args.clock, "threads": args.threads, "loadavg_start": os.getloadavg(), "data": data,
            "model": model, "rows": [], "comparisons": []}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="512:bf16-true", help="SEQ:PRECISION, comma-separated (precision: fp32, "
                    "bf16-true, bf16-mixed)")
    ap.add_argument("--batch", type=int, default=4, help="rows per step, both arms")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per arm")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each job (both arms, interleaved); rates are "
                    "the median over runs")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--out", default="benchmarks/results/packing.json")
    args = ap.parse_args(argv)
    for job in bt._list(args.jobs):
        seq, _, precision = job.partition(":")
        if not seq.isdigit() or precision not in ("fp32", "bf16-true", "bf16-mixed"):
            ap.error(f"--jobs: {job!r} is not SEQ:PRECISION (e.g. 512:bf16-true)")
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (process time sums every thread's)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not common.DATA.is_file():
        sys.exit(f"{common.DATA} is absent: this benchmark needs the reddit_tifu posts")
    t0 = time.perf_counter()
    result = start_result(args)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    run_grid(args, common.make_checkpoint("124m", common.bench_cache()), result, out)
    best_matmul_rate(result, args.clock)
    result["seconds"] = round(time.perf_counter() - t0)
    result["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=2) + "\n")
    import report_tables

    print(report_tables.render(result))
    print(f"\nraw results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
