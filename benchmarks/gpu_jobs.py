"""What benchmarks/gpu_run.py measures: one function per kind of row, each comparing loratune with its peer
in one process on one device (CUDA, or the CPU for the dry run).

- :func:`parity_row`: one Llama-style family's logits against transformers' on the same tiny random
  checkpoint (tests/family_models.py: large weights, every family feature switched on), fp32 and bf16.
- :func:`train_row`: LoRA or QLoRA training steps of one side on a random checkpoint of a real shape
  (tokens/s, peak allocated and reserved memory, the matmul roofline share, compile time).
- :func:`gen_row`: greedy decoding, loratune's ``generate`` against transformers' ``generate``.
- :func:`serve_rows`: ``loratune serve`` under concurrent clients (benchmarks/serve_load.py's client),
  and transformers + PEFT one request at a time as the reference a server around it could not beat.

Rows are plain dicts (JSON as written); a row that could not run carries ``skipped`` with the reason.
Memory on CUDA is the caching allocator's peak (``torch.cuda.max_memory_allocated`` / ``_reserved``),
reset per row; on the CPU dry run it is the process's peak RSS so far, which says nothing per row.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import resource
import statistics
import time
from pathlib import Path

import bench_families as families
import common
import torch
from gpu_check import rel_l2, rel_max  # the parity rows' measures, as gpu_check.py defines them

R, ALPHA = 16, 32.0
"""The training rows' LoRA: rank 16, alpha 32 on q and v (benchmarks/bench_qlora.py's setting)."""
PEER_TARGETS = ["q_proj", "v_proj"]
PARITY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3", "smollm3")
PARITY_FP32 = (1e-5, 1e-4)
"""fp32 (TF32 off): (relative L2, largest difference / largest reference value) against transformers' logits:
the tests' CPU bound is max |diff| <= 1e-4 on logits of magnitude > 1."""
PARITY_BF16_FACTOR = 1.5
"""bf16: both sides round differently, and these large random weights amplify rounding (transformers' own bf16
logits are several percent from its fp32 ones), so a fixed bf16-vs-bf16 bound would measure kernel choice. The
bound instead: our bf16 logits are at most 1.5x as far from the fp32 reference as transformers' bf16 logits are
(relative L2 and max, each + 1e-3). The direct bf16-vs-bf16 distance is recorded beside it."""
SERVE_ADAPTERS = ["t0", "t1", "t2", "t3"]


# --------------------------------------------------------------------------- devices and memory
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_memory(dev: torch.device) -> None:
    """Free what the last row left and start this row's peak counters."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peaks(dev: torch.device) -> dict:
    """Peak allocated and reserved bytes since the last reset (CUDA), or the process's peak RSS (CPU)."""
    if dev.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated(dev), "reserved": torch.cuda.max_memory_reserved(dev)}
    return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def matmul_tflops(dev: torch.device, n: int, repeats: int = 10) -> float:
    """bf16 TFLOP/s of one (n x n) @ (n x n) product on ``dev``: median of ``repeats`` after 3 warm-ups."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


# --------------------------------------------------------------------------- checkpoints and tokens
def make_checkpoint(model_type: str, preset: str, overrides: dict, root: Path, tokenizer_dir: Path | None) -> Path:
    """Random weights of ``model_type``'s ``preset`` (+ ``overrides``: the dry run's tiny widths) as a bf16
    Hugging Face checkpoint with a real tokenizer: ``tokenizer_dir``'s, else a small BPE trained here
    (tests/family_models.py). Written once per ``root``; loratune's init-model path, as bench_qlora.py."""
    from loratune.hub.export import save_hf_model
    from loratune.models.registry import FAMILIES

    name = preset + ("-tiny" if overrides else "")
    out = root / f"{name}-random-bf16"
    if (out / "config.json").exists():
        return out
    family = FAMILIES[model_type]
    config = family.config_from_hf({"model_type": model_type, **family.presets[preset], **overrides})
    with torch.device("meta"):
        model = family.build(config)
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty gives the tied head its own tensor
    model.init_weights(seed=0)
    if tokenizer_dir is None:
        tok = root / f"{name}-tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        common.tests_module("family_models").write_small_tokenizer(tok, min(320, config.vocab_size))
        tokenizer_dir = tok
    save_hf_model(model, out, tokenizer_dir=tokenizer_dir, dtype=torch.bfloat16, max_shard_size="1GB")
    return out


def token_ids(ckpt: Path, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """(rows, length) ids: real reddit_tifu text through the checkpoint's tokenizer where the data is here,
    else seeded random ids below the tokenizer's vocabulary."""
    from loratune.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    need, ids = rows * length, []
    if common.DATA.is_file():
        for line in common.DATA.read_text(encoding="utf-8").splitlines()[:2000]:
            ids += tok.encode(json.loads(line)["documents"]) + [tok.eos_id]
            if len(ids) >= need:
                break
    if len(ids) < need:
        gen = torch.Generator().manual_seed(seed)
        ids += torch.randint(0, tok.vocab_size, (need - len(ids),), generator=gen).tolist()
    return torch.tensor(ids[:need]).view(rows, length)


# --------------------------------------------------------------------------- parity


def parity_row(name: str, root: Path, dev: torch.device) -> dict:
    """Family ``name``'s logits, ours against transformers' (SDPA), on (2, 64) ids in fp32 and in bf16."""
    from transformers import AutoModelForCausalLM

    from loratune.models import load_model

    fm = common.tests_module("family_models")
    path = root / f"parity-{name}"
    if not (path / "config.json").exists():
        fm.save_family(name, path)
    ids = torch.randint(0, fm.BASE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1)).to(dev)
    row: dict = {"family": name, "ids": "2 x 64", "fp32_limits": PARITY_FP32, "bf16_factor": PARITY_BF16_FACTOR}
    out = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
        ours, _ = load_model(path, dtype=dtype, device=dev)
        ours.to(dev).eval()
        with torch.no_grad():
            out[label] = hf(ids).logits.float(), ours(ids).float()
        del hf, ours
    (ref, got), (ref16, got16) = out["fp32"], out["bf16"]
    row["fp32"] = {"rel_l2": rel_l2(got, ref), "rel_max": rel_max(got, ref), "ref_max_abs": float(ref.abs().max())}
    row["bf16"] = {"rel_l2": rel_l2(got16, ref16), "rel_max": rel_max(got16, ref16),
                   "ours_vs_fp32_l2": rel_l2(got16, ref), "ours_vs_fp32_max": rel_max(got16, ref),
                   "hf_vs_fp32_l2": rel_l2(ref16, ref), "hf_vs_fp32_max": rel_max(ref16, ref)}
    f, b, k = row["fp32"], row["bf16"], PARITY_BF16_FACTOR
    row["ok"] = (f["rel_l2"] <= PARITY_FP32[0] and f["rel_max"] <= PARITY_FP32[1]
                 and b["ours_vs_fp32_l2"] <= k * b["hf_vs_fp32_l2"] + 1e-3
                 and b["ours_vs_fp32_max"] <= k * b["hf_vs_fp32_max"] + 1e-3
                 and f["ref_max_abs"] > 1.0)  # a degenerate (flat) model would pass vacuously
    return row


# --------------------------------------------------------------------------- training
def has_compile_field() -> bool:
    """Whether the recipe has issue 27's ``compile`` field (regional torch.compile of the decoder blocks)."""
    from loratune.recipe import Recipe

    return "compile" in {f.name for f in dataclasses.fields(Recipe)}


def _ours(spec: dict, dev: torch.device):
    from loratune.recipe import load_recipe
    from loratune.train import setup_model

    overrides = [f"model={spec['ckpt']}", "finetune=lora", "precision=bf16-true", f"device={dev}",
                 f"seq_len={spec['seq']}", f"batch_size={spec['batch']}", "lr=1e-4", "max_grad_norm=1.0",
                 "schedule=constant", f"lora.r={R}", f"lora.alpha={ALPHA}", "lora.dropout=0.0", "lora.targets=q,v",
                 "seed=0", f"quantize={'nf4' if spec['case'] == 'qlora' else 'none'}"]
    if spec["compile"]:
        overrides.append("compile=true")
    recipe = load_recipe(None, overrides)
    model, _, _ = setup_model(recipe, dev)
    session = common.session(model, recipe, dev)
    return lambda ids: session.step(common.lm_batch(ids)).loss


def _peer(spec: dict, dev: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if spec["case"] == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": dev.index or 0} if dev.type == "cuda" else "cpu")
    model = AutoModelForCausalLM.from_pretrained(spec["ckpt"], **kwargs)
    if spec["case"] != "qlora":
        model = model.to(dev)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=PEER_TARGETS, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, eps=1e-6)
    forward = torch.compile(model, backend=spec["backend"]) if spec["compile"] else model

    def step(ids):
        loss = forward(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def train_row(spec: dict, dev: torch.device, tflops: float) -> dict:
    """``spec``: side, case (lora | qlora), compile, backend, shape, ckpt, seq, batch, warmup, steps. Times every
    step (synchronised); tokens/s from the median timed step; the first step's excess over it is the compile
    (and warm-up) time."""
    row = {k: spec[k] for k in ("shape", "case", "compile", "side", "seq", "batch", "warmup", "steps")}
    if spec["compile"]:
        row["backend"] = spec["backend"] if spec["side"] != "loratune" else "the recipe's (compile: true)"
        if spec["side"] == "loratune" and not has_compile_field():
            return {**row, "skipped": "not available: this checkout's recipe has no `compile` field"}
    if spec["case"] == "qlora" and spec["side"] != "loratune":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            return {**row, "skipped": f"not available: bitsandbytes does not import here ({exc})"}
    import torch._dynamo

    torch._dynamo.reset()  # no compiled graph of an earlier row is reused or counted
    reset_memory(dev)
    t0 = time.perf_counter()
    step = (_ours if spec["side"] == "loratune" else _peer)(spec, dev)
    sync(dev)
    row["setup_s"], setup = time.perf_counter() - t0, peaks(dev)
    blocks = token_ids(Path(spec["ckpt"]), spec["batch"] * (spec["warmup"] + spec["steps"]), spec["seq"] + 1)
    blocks = blocks.view(spec["warmup"] + spec["steps"], spec["batch"], spec["seq"] + 1).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses = [], []
    for blk in blocks:
        t = time.perf_counter()
        losses.append(float(step(blk)))
        sync(dev)
        times.append(time.perf_counter() - t)
    timed = statistics.median(times[spec["warmup"]:])
    steps = peaks(dev)
    cfg = families.hf_config(spec["ckpt"])
    flops = families.train_flops_per_token(cfg, "lora-qv", spec["seq"], R)
    tps = spec["batch"] * spec["seq"] / timed
    row.update(step_s=timed, first_step_s=times[0], compile_s=max(0.0, times[0] - timed) if spec["compile"] else None,
               tokens_per_s=tps, flops_per_token=flops, roofline_share=tps * flops / (tflops * 1e12),
               loss_first=losses[0], loss_last=losses[-1], setup_peak=setup, step_peak=steps,
               peak={k: max(setup[k], steps[k]) for k in setup})
    return row


# --------------------------------------------------------------------------- generation
def gen_row(spec: dict, dev: torch.device) -> dict:
    """Greedy decoding of ``new`` tokens after a ``prompt``-token prompt, batch ``batch``, bf16 weights; no stop
    token on either side, so every row decodes all ``new`` tokens."""
    row = {k: spec[k] for k in ("shape", "side", "batch", "prompt", "new", "warmup", "runs")}
    reset_memory(dev)
    prompt = token_ids(Path(spec["ckpt"]), spec["batch"], spec["prompt"], seed=1).to(dev)
    if spec["side"] == "loratune":
        from loratune.generate import SamplingConfig, generate
        from loratune.models import load_model

        model, _ = load_model(spec["ckpt"], dtype=torch.bfloat16, device=dev)
        model.to(dev).eval()
        cfg = SamplingConfig(max_new_tokens=spec["new"], temperature=0.0)
        run = lambda: generate(model, prompt, cfg)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["ckpt"], dtype=torch.bfloat16,
                                                     attn_implementation="sdpa").to(dev).eval()
        model.generation_config.eos_token_id = None
        mask = torch.ones_like(prompt)
        run = lambda: model.generate(prompt, attention_mask=mask, do_sample=False,
                                     max_new_tokens=spec["new"], pad_token_id=0)[:, spec["prompt"]:]
    times = []
    with torch.inference_mode():
        for i in range(spec["warmup"] + spec["runs"]):
            t = time.perf_counter()
            out = run()
            sync(dev)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    row.update(seconds=seconds, tokens_per_s=spec["batch"] * out.shape[1] / seconds, new_tokens=int(out.shape[1]),
               first_tokens=out[0, :8].tolist(), peak=peaks(dev))
    return row


# --------------------------------------------------------------------------- serving
def make_serve_adapters(ckpt: Path, root: Path, dev: torch.device) -> dict[str, Path]:
    """Four random LoRA adapters (r 8 on q and v, seeded by their place), saved in PEFT's format by loratune."""
    from loratune.adapters.lora import LoRAConfig, lora_layers
    from loratune.adapters.peft_format import save_adapter
    from loratune.adapters.targets import inject_lora
    from loratune.models import load_model

    out = {n: root / f"adapter-{n}" for n in SERVE_ADAPTERS}
    if all((p / "adapter_config.json").exists() for p in out.values()):
        return out
    model, _ = load_model(ckpt, dtype=torch.bfloat16, device=dev)
    cfg = LoRAConfig(r=8, alpha=16, targets=["q", "v"])
    inject_lora(model, cfg)
    for i, (name, path) in enumerate(out.items()):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for p in (*layer.lora_A.values(), *layer.lora_B.values()):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        save_adapter(model, path, cfg, base_model=str(ckpt))
    del model
    reset_memory(dev)
    return out


def serve_rows(spec: dict, dev: torch.device, deadline: float) -> list[dict]:
    """``loratune serve`` (bf16, ``--max-batch`` = clients) on a free loopback port: a warm-up burst, then
    ``requests`` requests over the four adapters from ``clients`` concurrent streaming clients; then, while
    time is left before ``deadline``, transformers + PEFT one request at a time (``set_adapter`` per request)
    over the first ``peer_requests`` of them."""
    import asyncio

    import serve_load

    ckpt, root = Path(spec["ckpt"]), Path(spec["root"])
    adapters = make_serve_adapters(ckpt, root, dev)
    texts = serve_load.prompts(ckpt, spec["requests"])
    jobs = [(t, SERVE_ADAPTERS[i % len(SERVE_ADAPTERS)]) for i, t in enumerate(texts)]
    base = {"shape": spec["shape"], "adapters": len(adapters), "prompt_tokens": serve_load.PROMPT_TOKENS,
            "max_tokens": spec["max_tokens"]}
    server = serve_load.Server.__new__(serve_load.Server)  # so that a budget stop while it starts still ends it
    try:
        server.__init__(ckpt, adapters, spec["clients"], extra=[
            "--device", str(dev), "--dtype", "bfloat16", "--max-queue", str(4 * spec["requests"])])
        asyncio.run(serve_load._burst(server.port, jobs[:4], 4, 4))
        results, wall = asyncio.run(serve_load._burst(server.port, jobs, spec["clients"], spec["max_tokens"]))
    finally:
        if getattr(server, "proc", None) is not None:
            server.close()
    rows = [{**base, "side": "loratune serve", **serve_load.summarise(
        f"loratune serve, mixed adapters, --max-batch {spec['clients']}", spec["clients"], results, wall)}]
    if time.time() > deadline - spec.get("peer_min_s", 10):
        rows.append({**base, "side": "transformers+PEFT", "skipped": "the section's budget was spent"})
        return rows
    rows.append({**base, "side": "transformers+PEFT", **_peer_serial(ckpt, adapters, jobs[:spec["peer_requests"]],
                                                                      spec["max_tokens"], dev)})
    return rows


def _peer_serial(ckpt: Path, adapters: dict[str, Path], jobs: list, max_tokens: int, dev: torch.device) -> dict:
    import serve_load
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratune.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    names = list(adapters)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    hf.generation_config.eos_token_id = None
    model = PeftModel.from_pretrained(hf, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    model.eval()
    results, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for prompt, name in jobs:
            s = time.perf_counter()
            model.set_adapter(name)
            ids = torch.tensor([tok.encode(prompt)], device=dev)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            sync(dev)
            results.append({"latency": time.perf_counter() - s, "ttft": None, "tokens": out.shape[1] - ids.shape[1]})
    del model, hf
    return serve_load.summarise("transformers+PEFT in-process, set_adapter per request, one at a time", 1, results,
                                time.perf_counter() - t0)
