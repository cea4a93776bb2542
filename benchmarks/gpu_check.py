"""The CUDA path, checked on a GPU against the references: run it where a GPU is present.

    [LORATUNE_BENCH_TOKENIZER=<dir with encoder.json + vocab.bpe>] python benchmarks/gpu_check.py [cuda|cpu]

Each check prints PASS or FAIL with its measured difference; the exit status is the number of
failures. Checks: our GPT-2's logits against transformers' on the GPU (fp32 and bf16); LoRA
q,v against PEFT's equivalent c_attn adapter on the GPU; greedy generation against
transformers' ``generate``; a short ``train()`` on the GPU (bf16-mixed) whose validation loss
must fall and whose adapter must have trained and load in PEFT with our logits. The tests
never need a GPU (they check the frozen base stays bit-identical); this script is what was
run on one.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import DATA, copy_gpt2_tokenizer  # noqa: E402 - this folder is on sys.path when run as a script
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def main() -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    from loratune.generate import SamplingConfig, generate
    from loratune.adapters.lora import LoRAConfig, lora_layers
    from loratune.models import load_model
    from loratune.adapters.targets import inject_lora

    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")  # "cpu" dry-runs the script itself
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="loratune-gpu-"))
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=4, n_head=8, n_positions=512, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0))
    ckpt = tmp / "model"
    hf.save_pretrained(ckpt)
    copy_gpt2_tokenizer(ckpt)
    hf = hf.to(dev).eval()
    ids = torch.randint(0, 50257, (4, 96), generator=torch.Generator().manual_seed(1)).to(dev)

    # 1. logits vs transformers, fp32 and bf16 (the reference cast to bf16 too)
    ours, _ = load_model(ckpt, device=dev)
    ours.to(dev).eval()
    with torch.no_grad():
        ref = hf(ids).logits
        diff = (ours(ids) - ref).abs().max().item()
    check("logits fp32 vs transformers", diff < 1e-3, f"max abs diff {diff:.2e} (limit 1e-3; TF32 off by default)")
    with torch.no_grad():
        a = ours.to(torch.bfloat16)(ids).float()
        b = hf.to(torch.bfloat16)(ids).logits.float()
        rel = ((a - b).norm() / b.norm()).item()
    check("logits bf16 vs transformers bf16", rel < 2e-2, f"relative L2 diff {rel:.2e} (limit 2e-2)")
    ours, _ = load_model(ckpt, device=dev)  # fresh fp32 weights (the bf16 round trip above was lossy)
    ours.to(dev).eval()

    # 2. LoRA q,v vs PEFT's c_attn adapter with the same update (our export of q/v slices)
    from peft import PeftModel

    from loratune.adapters.peft_format import save_adapter

    lora_cfg = LoRAConfig(r=4, alpha=32, targets=["q", "v"])
    inject_lora(ours, lora_cfg)
    gen = torch.Generator(device="cpu").manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            for p in (*layer.lora_A.values(), *layer.lora_B.values()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ours.to(dev)
    save_adapter(ours, tmp / "adapter", lora_cfg, base_model=str(ckpt))
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(ckpt), tmp / "adapter").to(dev).eval()
    with torch.no_grad():
        a, b = ours(ids), peft_model(input_ids=ids).logits
        rel = ((a - b).norm() / b.norm()).item()
    check("LoRA q,v vs PEFT on GPU", rel < 1e-5, f"relative L2 diff {rel:.2e} (limit 1e-5)")

    # 3. greedy generation vs transformers' generate (the adapter merged into both)
    from loratune.adapters.lora import merge_lora

    merge_lora(ours)
    merged = peft_model.merge_and_unload().eval()
    prompt = ids[:2, :16]
    cfg = SamplingConfig(max_new_tokens=48, temperature=0.0)
    a = generate(ours, prompt, cfg)
    b = merged.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=48,
                        min_new_tokens=48, pad_token_id=50256)[:, 16:]
    same = int((a == b).all(dim=1).sum())
    check("greedy generation vs transformers", same == 2, f"{same}/2 sequences identical over 48 tokens")

    # 4. a real training run on the GPU: loss falls, the adapter it writes loads in PEFT with our logits
    from loratune.recipe import load_recipe
    from loratune.train import train

    data = DATA
    if not data.is_file():
        print(f"SKIP  training on GPU: no data at {data}")
    else:
        recipe = load_recipe(None, [f"model={ckpt}", f"out_dir={tmp / 'run'}", f"device={dev}", "precision=bf16-mixed",
                                    f"data.source={data}", "data.text_field=documents", "data.val_fraction=0.1",
                                    "seq_len=128", "batch_size=16", "max_steps=60", "lr=2e-3", "eval_every=30",
                                    "eval_batches=null", "save_every=30", "log_every=10", "sample_tokens=16"])
        result = train(recipe, progress=False)
        import json

        evals = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        vals = [e["val_loss"] for e in evals if "val_loss" in e]
        check("GPU training: validation loss falls", len(vals) >= 2 and vals[-1] < vals[0],
              f"val loss {vals[0]:.4f} -> {vals[-1]:.4f}; {result.steps} steps in {result.seconds:.1f} s; "
              f"peak {result.peak_memory / 2**20:.0f} MiB")
        from loratune.adapters.peft_format import load_adapter

        trained, _ = load_model(ckpt, device=dev)
        load_adapter(trained, tmp / "run" / "adapter")
        trained.to(dev).eval()
        b_norm = sum(float(b.norm()) for _, layer in lora_layers(trained) for b in layer.lora_B.values())
        peft_trained = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(ckpt), tmp / "run" / "adapter")
        peft_trained = peft_trained.to(dev).eval()
        with torch.no_grad():
            a, b = trained(ids), peft_trained(input_ids=ids).logits
            rel = ((a - b).norm() / b.norm()).item()
        check("GPU training: the adapter trained and loads in PEFT with our logits", b_norm > 0 and rel < 1e-5,
              f"sum of |B| {b_norm:.3f} (0 before training); relative L2 diff to PEFT {rel:.2e} (limit 1e-5)")
    print(f"{len(FAILURES)} failure(s)" + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
