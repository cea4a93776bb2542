"""The preference and RL objectives under ``torchrun --nproc-per-node 2`` (DDP, gloo on CPU): each rank takes
its pairs or prompts, KTO's KL and GRPO's batch-scaled rewards are summed over ranks, and the result equals one
process: the adapter, every step's loss and the objective's metrics (TRL's names). Bounded launches on
127.0.0.1, as test_torchrun.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from test_torchrun import ADAPTER, SETTINGS, TOL, assert_same_tensors, in_process, job, launch  # noqa: F401
from loratune.train.metrics import read_metrics

BASE = [s for s in SETTINGS if not s.startswith(("data.text_field", "grad_accum", "sample"))] + ["sample_tokens=0"]


@pytest.fixture(scope="module")
def files(job) -> dict[str, Path]:  # noqa: F811  (the fixture of test_torchrun)
    rng = random.Random(0)
    root = job["root"]
    animals, places = ["cat", "dog", "fox", "bird"], ["garden", "park", "house", "river"]
    with (root / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for _ in range(40):
            a, p, q = rng.choice(animals), *rng.sample(places, 2)
            f.write(json.dumps({"prompt": f"where does the {a} sleep?", "chosen": f" in the {p}.",
                                "rejected": f" the {a} runs to the {q} and the {p}"}) + "\n")
    with (root / "prompts.jsonl").open("w", encoding="utf-8") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"where does the {animals[i % 4]} sleep", "answer": places[i % 3]}) + "\n")
    return {"pairs": root / "pairs.jsonl", "prompts": root / "prompts.jsonl"}


CASES = {
    "dpo": ["objective=dpo", "grad_accum=2"],
    "kto": ["objective=kto", "grad_accum=1"],
    "grpo": ["objective=grpo", "grad_accum=2", "batch_size=4", "grpo.group_size=3", "grpo.max_new_tokens=5",
             "grpo.beta=0.05", "grpo.scale_rewards=batch",
             "grpo.rewards=[{type: length, max_words: 2}, {type: regex, field: answer}]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(CASES))
def test_two_processes_equal_one(job, files, tmp_path, objective):  # noqa: F811
    data = files["prompts" if objective == "grpo" else "pairs"]
    settings = [*BASE, f"data.source={data}", *CASES[objective]]
    in_process(job, tmp_path / "one", settings)
    launch(job, tmp_path / "ddp", 2, settings)
    assert_same_tensors(tmp_path / "one" / ADAPTER, tmp_path / "ddp" / ADAPTER)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert len(one) == len(two) and any("val_loss" in r for r in one)
    for a, b in zip(one, two):
        assert a.keys() == b.keys(), (a, b)
        for key, value in a.items():
            if key in ("step", "lr") or key.endswith(("_s", "tokens_per_s")):
                continue
            # KTO's kl is a small difference of two summed log-probs of tens of nats, each computed here in
            # batches of another shape (4 rows a rank, not 8): fp32 rounding of the sums shows at ~1e-4
            tol = 1e-3 if key.endswith("kl") else TOL * max(1.0, abs(value))
            assert abs(value - b[key]) <= tol, (key, a, b)
