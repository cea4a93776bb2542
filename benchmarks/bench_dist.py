"""One process against torchrun's N processes on the tutorial's job shape, and the scaling on paper.

    python benchmarks/bench_dist.py --out benchmarks/results/dist.json [--nproc 2] [--steps 8] [--device cpu]

Measures, on this machine, in one run: the training step time of the tutorial's shape (GPT-2 124M,
random weights saved by transformers; LoRA r 4 on q and v; batch 32 x 128 tokens of the real
reddit_tifu posts in ../shared) in one process with all the cores, and under ``torchrun
--nproc-per-node N`` with DDP and with FSDP2 (one core per process on CPU; the global batch and the
result are the same); the all-reduce of the adapter's gradient alone (its bytes, median time); and
the machine's matmul rate, for each run's share of the roofline.

"On paper" is the line the ``scaling`` table extends: with N devices each computes 1/N of the batch,
so a step takes T1/N plus the gradient all-reduce, which a ring does by moving 2(N-1)/N of the
gradient's bytes per device. The prediction uses the measured T1 and all-reduce bandwidth; it leaves
out that a device runs a smaller batch less efficiently (that is what the measured N-process rows show).
Step times are the median over the steps after the first two (from metrics.jsonl's elapsed_s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_families as families
from common import DATA, bench_cache, machine, make_checkpoint

SEQ, BATCH, R = 128, 32, 4


def _recipe(ckpt: Path, data: Path, steps: int, device: str) -> list[str]:
    return ["--model", str(ckpt), "--data", str(data), "--max-steps", str(steps), "--no-progress",
            *[a for s in ("data.text_field=documents", "data.task=causal_lm", f"seq_len={SEQ}", f"batch_size={BATCH}",
                          "lora.r=4", "lora.alpha=32", "lora.targets=[q,v]", "lr=5e-5", "log_every=1", "eval_every=0",
                          "save_every=0", "sample_tokens=0", "data.val_fraction=0", "precision=fp32",
                          f"device={device}") for a in ("--set", s)]]


def _step_times(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    ends = [r["elapsed_s"] for r in rows]
    return [b - a for a, b in zip(ends, ends[1:])][1:]  # the first two steps warm up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(ckpt: Path, data: Path, steps: int, device: str, nproc: int, strategy: str | None, work: Path) -> dict:
    out = work / f"{strategy or 'single'}-{nproc}"
    train = ["-m", "loratune", "train", str(Path(__file__).parents[1] / "recipes" / "gpt2_reddit_tifu.yaml"),
             "--out", str(out), *_recipe(ckpt, data, steps, device)]
    if strategy:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", *train, "--set", f"strategy={strategy}"]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"nproc": nproc, "strategy": strategy or "one process", "error": done.stderr.strip()[-400:]}
    times = _step_times(out)
    step = statistics.median(times)
    return {"nproc": nproc, "strategy": strategy or "one process", "threads_per_process": env["OMP_NUM_THREADS"],
            "step_s": step, "steps_timed": len(times), "tokens_per_s": BATCH * SEQ / step,
            "wall_s": time.perf_counter() - t0}


def allreduce_job() -> None:
    """Under torchrun: the median time of an all-reduce of the adapter gradient's size (rank 0 prints JSON)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    numel = int(os.environ["BENCH_NUMEL"])
    t = torch.ones(numel)
    times = []
    for i in range(60):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        if i >= 10:
            times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        print(json.dumps({"numel": numel, "bytes": numel * 4, "median_s": statistics.median(times)}))
    dist.destroy_process_group()


def measure_allreduce(numel: int, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", __file__, "--allreduce"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_NUMEL": str(numel)})
    line = [x for x in done.stdout.splitlines() if x.startswith("{")]
    return json.loads(line[-1]) if line else {"error": done.stderr.strip()[-400:]}


def adapter_numel(ckpt: Path) -> int:
    """Trainable parameters of the job's adapter (LoRA r on q and v of every block)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    return cfg["n_layer"] * 2 * R * (cfg["n_embd"] + cfg["n_embd"])


def on_paper(t1: float, grad_bytes: int, bandwidth: float, ns=(2, 4, 8)) -> list[dict]:
    """Predicted step time on N devices: T1 / N + the ring all-reduce of the gradient at ``bandwidth`` B/s."""
    rows = []
    for n in ns:
        comm = 2 * (n - 1) / n * grad_bytes / bandwidth
        step = t1 / n + comm
        rows.append({"n": n, "step_s": step, "speedup": t1 / step, "allreduce_s": comm})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/dist.json"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--allreduce", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.allreduce:
        return allreduce_job()
    if not args.data.is_file():
        sys.exit(f"no data at {args.data}: pass --data (a JSONL file with a 'documents' field)")
    ckpt = make_checkpoint("124m", bench_cache())
    result = {"format": "dist", "machine": machine(args.device), "cpu_flags": families.cpu_flags(),
              "job": {"model": "gpt2 124m (random)", "lora": f"r {R}, q and v", "batch": BATCH, "seq": SEQ,
                      "precision": "fp32", "steps": args.steps}, "rows": []}
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    result["machine"]["matmul"] = families.matmul_rate()
    with tempfile.TemporaryDirectory() as tmp:
        for nproc, strategy in ((1, None), (args.nproc, "ddp"), (args.nproc, "fsdp")):
            row = run_job(ckpt, args.data, args.steps, args.device, nproc, strategy, Path(tmp))
            print(row, flush=True)
            result["rows"].append(row)
    numel = adapter_numel(ckpt)
    result["allreduce"] = {**measure_allreduce(numel, args.nproc), "nproc": args.nproc}
    t1 = result["rows"][0].get("step_s")
    ar = result["allreduce"]
    if t1 and ar.get("median_s"):
        bandwidth = 2 * (args.nproc - 1) / args.nproc * ar["bytes"] / ar["median_s"]
        result["allreduce"]["bus_bytes_per_s"] = bandwidth
        result["scaling"] = on_paper(t1, ar["bytes"], bandwidth)
    flops = families.train_flops_per_token(families.hf_config(ckpt), "lora-qv", SEQ, R)
    result["job"]["flops_per_token"] = flops
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
