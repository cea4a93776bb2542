"""A chat LoRA run offline: a tiny random Qwen3 with the real Qwen3 tokenizer and chat template, trained on
conversations with assistant-only loss. Validation loss falls, the adapter loads in PEFT with the same
logits, and ``generate --chat`` gives a short answer and stops at <|im_end|>."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from loratune.cli import main

QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen3"
WORDS = {"cat": "chat", "dog": "chien", "house": "maison", "water": "eau", "bread": "pain", "apple": "pomme",
         "book": "livre", "car": "voiture", "tree": "arbre", "sun": "soleil", "moon": "lune", "door": "porte",
         "milk": "lait", "fish": "poisson", "bird": "oiseau", "hand": "main"}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    if not (QWEN3 / "tokenizer.json").is_file():
        pytest.skip(f"{QWEN3} is not present (../shared holds the real tokenizers)")
    root = tmp_path_factory.mktemp("chat")
    assert main(["init-model", "--arch", "qwen3", "--preset", "tiny", "--tokenizer", str(QWEN3),
                 "--out", str(root / "model")]) == 0
    rows = [{"messages": [{"role": "user", "content": q.format(en)}, {"role": "assistant", "content": fr}]}
            for en, fr in WORDS.items() for q in ("Translate to French: {}", "What is '{}' in French?")]
    random.Random(0).shuffle(rows)
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "recipe.yaml").write_text(
        f"model: {root / 'model'}\nout_dir: {root / 'run'}\nlora: {{r: 16, alpha: 32, targets: all-linear}}\n"
        f"data: {{source: {root / 'chats.jsonl'}, task: chat, template_kwargs: {{enable_thinking: false}}, "
        "val_fraction: 0.125}\nseq_len: 48\nbatch_size: 8\nmax_steps: 60\nlr: 5.0e-3\nschedule: constant\n"
        "precision: fp32\neval_every: 20\nlog_every: 10\nsample_prompt: 'Translate to French: cat'\n"
        "sample_tokens: 8\n", encoding="utf-8")
    assert main(["train", str(root / "recipe.yaml"), "--no-progress"]) == 0
    return root


@pytest.mark.slow
def test_validation_loss_falls(chat_run):
    lines = [json.loads(x) for x in (chat_run / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [x["val_loss"] for x in lines if "val_loss" in x]
    assert len(val) >= 3 and val[-1] < val[0] - 0.5, val


@pytest.mark.slow
def test_the_adapter_loads_in_peft_with_our_logits(chat_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratune.adapters.peft_format import load_adapter
    from loratune.data import load_tokenizer
    from loratune.generate.chat import chat_prompt
    from loratune.models import load_model

    tok = load_tokenizer(chat_run / "model")
    ids, _ = chat_prompt(tok, "Translate to French: dog", enable_thinking=False)
    ours, _ = load_model(chat_run / "model")
    load_adapter(ours, chat_run / "run" / "adapter")
    base = AutoModelForCausalLM.from_pretrained(chat_run / "model", torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, chat_run / "run" / "adapter").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_generate_chat_answers_and_stops_at_im_end(chat_run, capsys):
    from loratune.adapters.peft_format import load_adapter
    from loratune.data import load_tokenizer
    from loratune.generate import SamplingConfig, generate
    from loratune.generate.chat import chat_prompt
    from loratune.models import load_model

    tok = load_tokenizer(chat_run / "model")
    ids, stops = chat_prompt(tok, "Translate to French: dog", enable_thinking=False)
    im_end = tok.backend.token_to_id("<|im_end|>")
    assert stops[0] == im_end
    model, _ = load_model(chat_run / "model")
    load_adapter(model, chat_run / "run" / "adapter")
    new = generate(model, torch.tensor([ids]), SamplingConfig(max_new_tokens=20), eos_ids=stops)[0].tolist()
    # a short answer, then the end of the turn. Which French word comes first is not asserted: the tiny random
    # model's first answer token wins by a margin near 0.01 logits, which another CPU's rounding may flip, while
    # <|im_end|> wins by ~0.65 after the answer's few tokens
    assert im_end in new and 0 < new.index(im_end) < 8
    assert main(["generate", "--chat", "--model", str(chat_run / "model"), "--adapter",
                 str(chat_run / "run" / "adapter"), "--template-var", "enable_thinking=false",
                 "--prompt", "Translate to French: dog", "--max-new-tokens", "20"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == tok.decode(new[:new.index(im_end)]).strip() and "<|im_end|>" not in answer
