"""The whole-process peak memory of a QLoRA run against plain LoRA, with the base quantized while it loads.

Each job is a fresh process (``python benchmarks/bench_qlora_load.py --worker JSON``) that sets up the
model through the real path -- ``setup_model`` from a recipe (for ``qlora-old``: the order before this
change, the whole base loaded in its stored dtype, the adapter injected, then ``quantize_model``) -- and
runs the loop's training step (``TrainingSession.step``) a few times. It reports /proc/self/status's
VmHWM (the peak resident memory since the process started: Python, torch and the code count too) after
the imports, after the setup and after the steps, and the memory guard's estimate of the setup peak
(``guards.estimate_setup_memory``) against the measured setup peak over the imports' baseline.

Shapes (random weights, cached under --cache):

- ``1b``: Llama-3.2-1B (``bench_qlora.make_llama_checkpoint``: a bf16 checkpoint, tied head), batch 1;
- ``250m``: a 243M-parameter Llama shape (hidden 1024, MLP 2816, 18 layers, 16 heads / 8 kv heads,
  Llama 2's 32,000-token vocabulary, untied head) stored in float32, the tutorial recipe's batch 2 x 64.

LoRA r=4 on q and v (the tutorial's), fp32 precision (this CPU has no bf16 matmul units), AdamW, every
step at the same lr. Every row is a single run; run it under the CPU lock (the grid holds ~6 GiB).

    python benchmarks/bench_qlora_load.py                          # both shapes, lora / qlora / qlora-old
    python benchmarks/bench_qlora_load.py --shapes 250m --cases qlora,lora
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_families as families  # noqa: E402
import common  # noqa: E402
from bench_qlora import rss as status  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "qlora_load.json"
LLAMA2 = ROOT.parent / "shared" / "tokenizers" / "llama2"
CASES = ("lora", "qlora", "qlora-old")
SHAPES = {"1b": dict(seq=512, batch=1), "250m": dict(seq=64, batch=2)}
SHAPE_250M = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def make_250m_checkpoint(cache: Path) -> Path:
    """Random weights of the 243M shape as a float32 Hugging Face checkpoint (made once per cache)."""
    out = cache / "llama-243m-random-fp32"
    if (out / "config.json").exists():
        return out
    import torch

    from loratune.hub.export import save_hf_model
    from loratune.models.registry import FAMILIES

    family = FAMILIES["llama"]
    with torch.device("meta"):
        model = family.build(family.config_from_hf(SHAPE_250M))
    model = model.to_empty(device="cpu")
    model.init_weights(seed=0)
    save_hf_model(model, out, tokenizer_dir=LLAMA2 if LLAMA2.is_dir() else None, dtype=torch.float32)
    return out


def old_setup(recipe, device):
    """setup_model's QLoRA before quantize-while-loading: load whole (stored 16-bit dtype), inject, quantize."""
    import torch

    from loratune.adapters.targets import inject_lora
    from loratune.adapters.trainable import set_trainable
    from loratune.models import load_model
    from loratune.quant.model import cast_base, load_dtype, quantize_model, recipe_quantization
    from loratune.train.allocator import prefer_memory

    prefer_memory(device)
    model, model_dir = load_model(recipe.model, dtype=load_dtype(recipe.model, torch.float32), device=device)
    inject_lora(model, recipe.lora)
    quantize_model(model, recipe_quantization(recipe), model_dir)
    cast_base(model, torch.float32)
    set_trainable(model, "lora")
    return model


def worker(spec: dict) -> dict:
    import torch

    from loratune.quant.model import load_dtype
    from loratune.recipe import load_recipe
    from loratune.train import setup_model
    from loratune.train.guards import estimate_setup_memory, estimate_training_memory

    torch.manual_seed(0)
    recipe = load_recipe(None, [f"model={spec['ckpt']}", "finetune=lora", "precision=fp32", "device=cpu",
                                f"seq_len={spec['seq']}", f"batch_size={spec['batch']}", "lr=1e-4", "schedule=constant",
                                "lora.r=4", "lora.alpha=32", "lora.targets=q,v", "seed=0",
                                f"quantize={'none' if spec['case'] == 'lora' else 'nf4'}"])
    device = torch.device("cpu")
    imports = status("VmRSS")
    t0 = time.perf_counter()
    model = old_setup(recipe, device) if spec["case"] == "qlora-old" else setup_model(recipe, device)[0]
    setup_s = time.perf_counter() - t0
    setup_peak, resident = status("VmHWM"), status("VmRSS")
    session = common.session(model, recipe)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"] + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        session.step(common.lm_batch(ids))
        times.append(time.perf_counter() - t0)
    load_bytes = load_dtype(recipe.model, torch.float32).itemsize
    return {"imports_rss": imports, "setup_peak": setup_peak, "resident_after_setup": resident,
            "process_peak": status("VmHWM"), "setup_s": round(setup_s, 2), "step_s": [round(t, 2) for t in times],
            "setup_estimate": estimate_setup_memory(model, load_bytes) + imports,
            "step_estimate": estimate_training_memory(model, spec["batch"], spec["seq"], "fp32", "lora").total,
            "loadavg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=0, help="sequence length (0: the shape's: 512 for 1b, 64 for 250m)")
    ap.add_argument("--cache", default=os.environ.get("LORATUNE_BENCH_CACHE", "/tmp/loratune-bench"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per job")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--append", action="store_true", help="add to --out's rows (replacing the same shape and case)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from bench_qlora import make_llama_checkpoint

    out = Path(args.out)
    result = {"format": "qlora_load", "command": "python benchmarks/" + " ".join([Path(__file__).name,
                                                                               *(argv or sys.argv[1:])]),
              "machine": {"cpu": families.cpu_name() or platform.machine(), "cores": os.cpu_count()}, "rows": []}
    if args.append and out.is_file():
        result["rows"] = json.loads(out.read_text())["rows"]
    for shape in args.shapes.split(","):
        ckpt = make_llama_checkpoint(Path(args.cache)) if shape == "1b" else make_250m_checkpoint(Path(args.cache))
        for case in args.cases.split(","):
            spec = {"case": case, "shape": shape, "ckpt": str(ckpt), "steps": args.steps,
                    **SHAPES[shape], **({"seq": args.seq} if args.seq else {})}
            t0 = time.time()
            row = common.in_subprocess(__file__, spec, timeout=args.timeout)
            row = {"shape": shape, "case": case, "seq": spec["seq"], "batch": spec["batch"], "steps": args.steps,
                   "checkpoint_dtype": "bf16" if shape == "1b" else "fp32",
                   **{k: v for k, v in row.items() if k not in spec}, "single_run": True,
                   "job_s": round(time.time() - t0, 1)}
            result["rows"] = [r for r in result["rows"] if (r["shape"], r["case"]) != (shape, case)] + [row]
            gib = 2**30
            print(f"{shape} {case:10s} " + (f"setup peak {row['setup_peak'] / gib:.2f} GiB (estimate "
                                               f"{row['setup_estimate'] / gib:.2f}), process peak "
                                               f"{row['process_peak'] / gib:.2f} GiB, imports "
                                               f"{row['imports_rss'] / gib:.2f} GiB"
                                               if "error" not in row else row["error"]), flush=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
