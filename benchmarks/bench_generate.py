"""Greedy generation at batch 1 on Llama shapes: loratune's ``generate`` and its serving engine against
transformers' ``generate``, side by side, with the memory-bandwidth roofline.

    python benchmarks/bench_generate.py --stage before --out benchmarks/results/generate-llama.json
    python benchmarks/bench_generate.py --stage after --sizes smollm2-135m --precisions fp32,bf16 \\
        --out benchmarks/results/generate-llama.json
    python benchmarks/bench_generate.py --profile --sizes smollm2-135m --precisions fp32   # where a token goes

Each row: one (shape, precision, path) of loratune (``generate``: the library function ``loratune generate``
calls; ``serve engine``: :class:`loratune.generate.engine.Engine` with one request at a time) against one
transformers mode (``dynamic cache``: its default; ``static cache + compile``: ``cache_implementation="static"``
with its forward compiled by torch.compile, the peer's best where it runs). The models are the random
checkpoints of ``bench_families.py`` (the published shapes, written once, loaded by both sides), the prompt 32
tokens of real reddit_tifu text. Every job runs in a fresh subprocess (peak RSS is its own), does one warm-up
generation (for compiled modes, that is where compilation happens: its time is recorded as ``first_s``) and
``--repeats`` timed ones; tokens/s is the median. Stops are off on both sides (every run makes exactly
``--new`` tokens), and the whole greedy continuation of each side is recorded: ``first tokens agree`` in the
table compares the first 8, ``agree_prefix`` in the JSON is how many of all agree.

Decoding one token at batch 1 reads every weight of the projections and the output head once, so its
floor is (those bytes) / (memory read bandwidth): ``--new`` tokens x ``weight_bytes`` / time, as a share of
the read bandwidth measured here (a 256 MiB fp32 sum, same threads, same clock) is each side's
``bandwidth_share``. ``--threads 1 --clock cpu`` (the default) times by the process's CPU time, as
bench_train.py does on a shared machine; both clocks are recorded with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import bench_families as families
from common import ROOT, bench_cache, in_subprocess, machine, make_checkpoint

PROMPT = 32


# --------------------------------------------------------------------------- one job, in a subprocess
def prompt_ids(ckpt: Path):
    import torch

    from bench_train import token_batches

    return token_batches(ckpt, 1, PROMPT, 1)[0][:, :PROMPT].to(torch.long)


def weight_bytes(ckpt: Path, precision: str) -> int:
    """Bytes of weights one decoded token reads: every projection and the output head (not the embedding row)."""
    return families.matmul_params(families.hf_config(ckpt)) * (2 if precision == "bf16" else 4)


def read_bandwidth(clock: str) -> float:
    """GB/s of reading a 256 MiB fp32 tensor (a sum), median of 5, by ``clock``."""
    import torch

    x = torch.ones(64 * 2**20)
    timer = time.process_time if clock == "cpu" else time.perf_counter
    x.sum()
    times = []
    for _ in range(5):
        t0 = timer()
        x.sum()
        times.append(timer() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def _loratune_runner(spec: dict, ckpt: Path, prompt, dtype):
    import torch

    from loratune.generate import SamplingConfig, generate
    from loratune.models import load_model

    model, _ = load_model(ckpt, dtype=dtype, device=torch.device("cpu"))
    model.eval()
    cfg = SamplingConfig(max_new_tokens=spec["new"], temperature=0.0)
    options = spec.get("options") or {}
    if spec["path"] == "generate":
        return lambda: generate(model, prompt, cfg, **options)[0].tolist()
    from loratune.generate.engine import Engine, Request

    engine = Engine(model, max_batch=1, max_len=PROMPT + spec["new"], compile=bool(options.get("compile")))
    if options.get("static") is False:
        engine.static = None  # every token through the model's hidden_states, as before the static step

    def serve():
        engine.submit(Request(prompt[0].tolist(), sampling=cfg, stop_ids=()))
        done = []
        while engine.busy():
            done += engine.step()[1]
        return done[0].tokens

    return serve


def _peer_runner(spec: dict, ckpt: Path, prompt, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=dtype).eval()
    mask = torch.ones_like(prompt)
    eos = families.hf_config(ckpt).get("eos_token_id")
    pad = eos[0] if isinstance(eos, list) else eos
    extra = {}
    if spec["peer"] == "static cache + compile":
        from transformers import CompileConfig

        compile_config = CompileConfig(mode="default")  # "reduce-overhead" is CUDA graphs
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
        extra = dict(cache_implementation="static", compile_config=compile_config)
    return lambda: model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=spec["new"],
                                  min_new_tokens=spec["new"], pad_token_id=pad, **extra)[0, PROMPT:].tolist()


def run_job(spec: dict) -> dict:
    """One side of one row: ``1 + repeats`` greedy generations of ``new`` tokens; the median of the timed ones."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    ckpt = Path(spec["ckpt"])
    prompt = prompt_ids(ckpt)
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    t0 = time.perf_counter()
    run = (_loratune_runner if spec["side"] == "loratune" else _peer_runner)(spec, ckpt, prompt, dtype)
    load_s = time.perf_counter() - t0
    wall, cpu, tokens = [], [], None
    with torch.inference_mode():
        for _ in range(1 + spec["repeats"]):
            w0, c0 = time.perf_counter(), time.process_time()
            tokens = run()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    timed = cpu[1:] if spec["clock"] == "cpu" else wall[1:]
    t = statistics.median(timed)
    return {**spec, "tokens_per_s": len(tokens) / t, "seconds": timed, "wall_s": wall, "cpu_s": cpu,
            "first_s": wall[0], "load_s": load_s, "tokens": tokens, "first_tokens": tokens[:8],
            "peak_memory": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "loadavg": os.getloadavg()[0]}


def profile_job(spec: dict) -> None:
    """torch.profiler over ``new`` decoded tokens of loratune's generate: the top operators by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(spec["threads"])
    ckpt = Path(spec["ckpt"])
    prompt = prompt_ids(ckpt)
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    run = _loratune_runner({**spec, "path": "generate"}, ckpt, prompt, dtype)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.process_time()
        run()
        total = time.process_time() - t0
    print(f"{spec['size']} {spec['precision']} {spec.get('options')}: {spec['new']} tokens in {total:.2f} CPU s "
          f"({1e3 * total / spec['new']:.1f} ms/token)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


# --------------------------------------------------------------------------- the grid
STAGE_OPTIONS = {"before": {"static": False}, "after": {}, "after-compile": {"compile": True}}
"""loratune's keyword options per stage: ``before`` is the path without the static decoding step (every token
through ``hidden_states``), ``after`` the defaults (the static step), ``after-compile`` the step compiled."""


def one_row(args, size: str, ckpt: Path, precision: str, path: str, peer: str, peer_res: dict | None) -> tuple[dict, dict]:
    base = {"size": size, "precision": precision, "new": args.new, "repeats": args.repeats, "ckpt": str(ckpt),
            "threads": args.threads, "clock": args.clock}
    ours = in_subprocess(__file__, {**base, "side": "loratune", "path": path,
                                    "options": json.loads(args.options) if args.options else STAGE_OPTIONS[args.stage]})
    print(_line(ours), file=sys.stderr, flush=True)
    if peer_res is None:
        peer_res = in_subprocess(__file__, {**base, "side": "transformers", "peer": peer})
        print(_line(peer_res), file=sys.stderr, flush=True)
    row = {"size": size, "precision": precision, "batch": 1, "new_tokens": args.new, "path": path, "peer": peer,
           "stage": args.stage, "weight_bytes": weight_bytes(ckpt, precision)}
    for name, res in (("loratune", ours), ("transformers", peer_res)):
        row[name] = _side(res, row["weight_bytes"], args.bandwidth)
    a, b = ours.get("tokens") or [], peer_res.get("tokens") or []
    row["agree_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return row, peer_res


def _side(res: dict, nbytes: int, bandwidth: float) -> dict:
    if "error" in res:
        return {"tokens_per_s": None, "runs": 0, "errors": [res["error"]]}
    keep = ("tokens_per_s", "peak_memory", "first_tokens", "tokens", "first_s", "load_s", "wall_s", "cpu_s",
            "loadavg", "options")
    return {**{k: res[k] for k in keep if k in res}, "runs": len(res["seconds"]),
            "bandwidth_share": res["tokens_per_s"] * nbytes / (bandwidth * 1e9)}


def _line(res: dict) -> str:
    what = f"{res.get('side')} {res.get('size')} {res.get('precision')} {res.get('path') or res.get('peer')}"
    if "error" in res:
        return f"{what}: FAILED {res['error']}"
    return f"{what}: {res['tokens_per_s']:.1f} tok/s, first run {res['first_s']:.1f} s, peak RSS {res['peak_memory'] / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="smollm2-135m,qwen3-0.6b")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--paths", default="generate,serve engine")
    ap.add_argument("--peers", default="dynamic cache", help="transformers modes: 'dynamic cache', "
                                                             "'static cache + compile'")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--stage", choices=tuple(STAGE_OPTIONS), default="after")
    ap.add_argument("--options", help="loratune's options as JSON (default: the stage's)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of loratune's decoding")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("profile"):
            profile_job(spec)
            return 0
        print(json.dumps(run_job(spec)))
        return 0
    cache = bench_cache()
    sizes = [s for s in args.sizes.split(",") if s and not families.skip_reason(s)]
    if args.profile:
        for size in sizes:
            for precision in args.precisions.split(","):
                spec = {"profile": True, "size": size, "precision": precision, "new": args.new,
                        "ckpt": str(make_checkpoint(size, cache)), "threads": args.threads,
                        "options": json.loads(args.options) if args.options else STAGE_OPTIONS[args.stage]}
                os.system(f"{sys.executable} {__file__} --worker '{json.dumps(spec)}'")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    args.bandwidth = read_bandwidth(args.clock)
    print(f"read bandwidth: {args.bandwidth:.1f} GB/s ({args.threads} thread(s), {args.clock} clock)", file=sys.stderr)
    result = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {"format": 2, "generate": []}
    host = machine()
    host["cpu_flags"] = families.cpu_flags()
    result["machine"] = host
    result.setdefault("runs", {})[f"{args.stage} {time.strftime('%Y-%m-%d %H:%M')}"] = {
        "args": {k: str(v) for k, v in vars(args).items() if k != "worker"}, "read_bandwidth_gbs": args.bandwidth,
        "loadavg_start": os.getloadavg()}
    result.setdefault("train", [])
    for size in sizes:
        ckpt = make_checkpoint(size, cache)
        for precision in args.precisions.split(","):
            for peer in args.peers.split(","):
                peer_res = None
                for path in args.paths.split(","):
                    row, peer_res = one_row(args, size, ckpt, precision, path, peer, peer_res)
                    row["read_bandwidth_gbs"] = args.bandwidth
                    result["generate"].append(row)
                    if args.out:
                        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    raise SystemExit(main())
