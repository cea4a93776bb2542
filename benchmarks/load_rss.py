"""Peak memory of reading a sharded multi-GB checkpoint: loratune's reader vs safetensors' own loader.

Builds (once) a sharded safetensors checkpoint of a Llama-shaped model in bfloat16 (TinyLlama's
widths, fewer layers: about 1.7 GiB), written by ``safetensors.torch.save_file`` into several
shards with a ``model.safetensors.index.json``. Then, in a fresh subprocess per case (so peak RSS
is that case's alone), it reads the checkpoint and reports peak RSS (``ru_maxrss`` and
/proc/self/status VmHWM) against the size of the weights it holds afterwards:

- ``loratune bf16``: ``read_state_dict(dir)``, the bfloat16 weights kept;
- ``loratune -> fp32``: ``read_state_dict(dir, dtype=torch.float32)``, converted tensor by tensor;
- ``safetensors bf16``: ``safetensors.torch.load_file`` per shard, merged into one dict (the peer);
- ``safetensors -> fp32``: the same, each shard's tensors converted after that shard is loaded.

After reading, every page of every tensor is touched (as building a model from them would): a
memory-mapped peer otherwise shows pages it has not faulted in yet. The ratio is the larger of
the two peaks over the weights' size; ``ratio-base`` subtracts what the process held before
reading (Python, torch, loratune). ``s`` is the reading call; ``ready s`` adds touching every
page (safetensors maps the file and reads lazily, so only ``ready s`` compares). The parent
process never imports torch and builds the checkpoint in a child: on Linux a process's
``ru_maxrss`` carries over its parent's peak across fork and exec, which would make every row
start from the builder's.

The shards are in the page cache when read (just written or read before): the seconds are
warm-cache reads, and each case runs once (rows are marked ``single_run``).

    python benchmarks/load_rss.py                         # build in a temp dir, measure, delete it
    python benchmarks/load_rss.py --dir /tmp/llama-shards  # build there once (kept), measure
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
CASES = ("loratune bf16", "loratune -> fp32", "safetensors bf16", "safetensors -> fp32")
SHAPE = {"vocab": 32000, "hidden": 2048, "intermediate": 5632, "kv_hidden": 256, "layers": 18}
"""TinyLlama-1.1B's widths (grouped-query attention: 4 KV heads of 64), 18 of its 22 layers."""
RESULTS = Path(__file__).resolve().parent / "results" / "load_rss.json"


def llama_shapes(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as transformers' LlamaForCausalLM saves them (untied head)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    h, kv, f = s["hidden"], s["kv_hidden"], s["intermediate"]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (s["vocab"], h)})
    return shapes


def build(d: Path, shards: int) -> dict:
    """Write the checkpoint shard by shard (never more than one shard in memory); skip if it is there."""
    import torch
    from safetensors.torch import save_file

    index_path = d / "model.safetensors.index.json"
    if index_path.is_file():
        return json.loads(index_path.read_text())
    d.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(SHAPE)
    nbytes = {name: 2 * torch.Size(shape).numel() for name, shape in shapes.items()}
    total, groups, size = sum(nbytes.values()), [[]], 0
    for name in shapes:  # split by size first, so that the shard count is known before writing
        if groups[-1] and size + nbytes[name] > total / shards * 1.01:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes[name]
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        group = {name: (torch.randn(shapes[name], generator=gen) * 0.02).bfloat16() for name in names}
        save_file(group, str(d / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del group
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=2))
    return index


def peak_rss() -> tuple[float, float]:
    """(ru_maxrss, VmHWM) of this process in GiB: the most resident memory it ever had."""
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, hwm * 1024 / GIB


def child(case: str, d: Path) -> None:
    """Run one case in this (fresh) process and print its row as JSON."""
    import safetensors
    import torch
    from safetensors.torch import load_file

    from loratune.hub.files import read_state_dict

    baseline = max(peak_rss())  # torch and loratune imported, nothing read yet
    start = time.perf_counter()
    if case.startswith("loratune"):
        state = read_state_dict(d, torch.float32 if case.endswith("fp32") else None)
    else:
        state = {}
        files = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
        for file in files:
            shard = load_file(str(d / file))
            state.update({k: v.float() for k, v in shard.items()} if case.endswith("fp32") else shard)
            del shard
    seconds = time.perf_counter() - start
    for t in state.values():  # use every page, as a model built from these weights will
        t.reshape(-1).view(torch.uint8)[::4096].sum()
    ready = time.perf_counter() - start
    maxrss, hwm = peak_rss()
    peak = max(maxrss, hwm)
    weights = sum(t.numel() * t.element_size() for t in state.values()) / GIB
    print(json.dumps({"case": case, "weights_gib": round(weights, 3), "baseline_rss_gib": round(baseline, 3),
                      "peak_rss_gib": round(maxrss, 3), "vmhwm_gib": round(hwm, 3),
                      "ratio": round(peak / weights, 3), "ratio_over_baseline": round((peak - baseline) / weights, 3),
                      "seconds": round(seconds, 2), "ready_seconds": round(ready, 2), "single_run": True,
                      "torch": torch.__version__, "safetensors": safetensors.__version__}))


def machine() -> dict:
    """The CPU (lscpu's model name), cores and RAM; torch's version comes from the measuring processes."""
    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(mem * 1024 / GIB, 1),
            "python": platform.python_version()}


def _run_child(*args: str) -> str:
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout


def measure(d: Path, shards: int) -> dict:
    start = time.perf_counter()
    _run_child("--child", "build", "--dir", str(d), "--shards", str(shards))  # this process stays lean (see main)
    built = time.perf_counter() - start
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    for file in files:  # warm the page cache the same way for every case
        with open(d / file, "rb") as f:
            while f.read(1 << 26):
                pass
    rows, load_before = [], round(os.getloadavg()[0], 2)  # other jobs on the machine slow the seconds, not the RSS
    for case in CASES:
        rows.append(json.loads(_run_child("--child", case, "--dir", str(d)).strip().splitlines()[-1]))
        print(f"  {case}: done", file=sys.stderr)
    file_gib = sum((d / f).stat().st_size for f in files) / GIB
    versions = {k: rows[0][k] for k in ("torch", "safetensors")}  # the same in every row: kept once
    rows = [{k: v for k, v in row.items() if k not in versions} for row in rows]
    return {"command": "python " + " ".join(sys.argv), "machine": {**machine(), **versions},
            "checkpoint": {**SHAPE, "shards": len(files), "tensors": len(index["weight_map"]),
                           "files_gib": round(file_gib, 3), "dtype": "bfloat16", "build_seconds": round(built, 1)},
            "page_cache": "warm (shards read once before the cases)", "runs": "each case once, in a fresh process",
            "load_average_1m": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
            "rows": rows}


def table(result: dict) -> str:
    header = (f"{'case':<22}{'weights GiB':>12}{'baseline GiB':>13}{'peak RSS GiB':>13}{'VmHWM GiB':>10}"
              f"{'ratio':>7}{'ratio-base':>11}{'s':>7}{'ready s':>8}")
    lines = [header]
    for r in result["rows"]:
        lines.append(f"{r['case']:<22}{r['weights_gib']:>12.3f}{r['baseline_rss_gib']:>13.3f}{r['peak_rss_gib']:>13.3f}"
                     f"{r['vmhwm_gib']:>10.3f}{r['ratio']:>7.2f}{r['ratio_over_baseline']:>11.2f}{r['seconds']:>7.2f}"
                     f"{r['ready_seconds']:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where to build (and keep) the checkpoint; default: a temp dir")
    parser.add_argument("--shards", type=int, default=4, help="number of shards")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    parser.add_argument("--child", choices=(*CASES, "build"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        build(args.dir, args.shards)
        return
    if args.child:
        child(args.child, args.dir)
        return
    d = args.dir or Path(tempfile.mkdtemp(prefix="load-rss-"))
    try:
        result = measure(d, args.shards)
    finally:
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
