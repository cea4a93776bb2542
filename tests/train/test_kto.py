"""loratune/train/kto.py: KTO gives TRL 1.16's KTOTrainer loss, adapter gradients and logged metrics on the
same tiny Llama and LoRA weights (the KL term from the KL rows, clamped at 0, the desirable and undesirable
weights); the KL estimate of prepare() covers the whole batch; a precomputed reference covers the completions;
a full fine-tune is refused."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from loratune.data import Batches
from loratune.data.preference_items import UnpairedItem
from loratune.errors import ConfigError
from loratune.models import load_model
from loratune.train.kto import KTOObjective, kl_sums
from loratune.train.objective import make_objective

from test_preference import (  # noqa: F401  (llama, pairs_file: fixtures, used here too)
    PAD,
    RTOL,
    assert_grads_match,
    assert_micro_batches_agree,
    base_as_reference,
    grad_err,
    llama,
    make_models,
    our_step,
    pairs_file,
    preference_session,
    recipe,
    rel,
)

# (prompt, completion, desirable): both kinds, completions of different lengths
EXAMPLES = [([5, 9, 14, 3], [20, 21, 22, 2], True),
            ([7, 8], [40, 41, 42, 43, 44, 2], False),
            ([11, 12, 13, 14, 15], [60, 2], True),
            ([16, 17, 18], [80, 81, 2], False),
            ([19, 6], [90, 91, 92, 2], True)]


def items(examples=EXAMPLES) -> list[UnpairedItem]:
    return [UnpairedItem(p, c, d, limit=64) for p, c, d in examples]


def our_batch(examples=EXAMPLES) -> dict[str, torch.Tensor]:
    """The data side's collation (row 1: TRL's KL row, the completions rotated by one)."""
    return Batches(items(examples), len(examples), shuffle=False, pad_id=PAD, drop_last=False).batch(0, 0)


def trl_kto(peft, llama, examples=EXAMPLES, **config):
    """TRL's KTOTrainer.compute_loss on the examples (its collator, KL completions rotated by one as its
    dataset map does for one batch), backward; returns the loss and its metrics."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    ds = Dataset.from_dict({"prompt": ["t5 t6"] * 2, "completion": [" t7", " t8"], "label": [True, False]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = base_as_reference(KTOTrainer(
            model=peft, args=KTOConfig(output_dir=str(llama / "trl"), report_to=[], use_cpu=True, bf16=False,
                                       disable_tqdm=True, per_device_train_batch_size=len(examples), **config),
            train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(llama)))
    completions = [c for _, c, _ in examples]
    rotated = [completions[-1]] + completions[:-1]
    inputs = DataCollatorForUnpairedPreference(pad_token_id=PAD)(
        [{"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": d}
         for (p, c, d), k in zip(examples, rotated)])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), {k: v[-1] for k, v in trainer._metrics["train"].items()}


KTO_METRICS = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "logits/chosen", "logits/rejected", "entropy"]


@pytest.mark.parametrize("knobs", [{}, {"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.6}],
                         ids=["default", "weighted"])
def test_kto_matches_trl(llama, knobs):
    ours, peft, pairs = make_models(llama)
    expected, trl_metrics = trl_kto(peft, llama, **knobs)
    loss, metrics = our_step(make_objective("kto", recipe(**knobs)), ours, our_batch())
    assert rel(loss, expected) <= RTOL, (loss, expected)
    assert_grads_match(pairs)
    for name in KTO_METRICS:
        assert rel(metrics[name], trl_metrics[name]) <= RTOL, (name, metrics[name], trl_metrics[name])
    assert metrics["kl"] > 0  # the KL term is live (not clamped away) in this batch


def test_a_negative_kl_estimate_is_clamped_at_zero(llama):
    """TRL clamps the batch's KL estimate at 0; with the adapter flipped (B -> -B) this batch's estimate is
    negative, and both give kl 0 and the same loss."""
    ours, peft, pairs = make_models(llama)
    with torch.no_grad():
        for name, (p, q) in pairs.items():
            if ".lora_B." in name:
                p.neg_(), q.neg_()
    objective = make_objective("kto", recipe())
    total, _ = kl_sums(ours, our_batch()["input_ids"], our_batch()["labels"])
    assert total < 0
    expected, trl_metrics = trl_kto(peft, llama)
    loss, metrics = our_step(objective, ours, our_batch())
    assert metrics["kl"] == trl_metrics["kl"] == 0
    assert rel(loss, expected) <= RTOL
    assert_grads_match(pairs)


def test_prepare_takes_the_kl_of_the_whole_batch(llama):
    """Split into micro-batches, every part uses the one KL of the batch prepare() computed (TRL's of a batch
    of that size): the loss and gradients are the one-batch ones."""
    ours, _, pairs = make_models(llama)
    objective = make_objective("kto", recipe())
    metrics, split_metrics = assert_micro_batches_agree(objective, ours, pairs, our_batch())
    assert split_metrics["kl"] == pytest.approx(metrics["kl"], rel=1e-6)
    prepared = objective.prepare(ours, our_batch(), 0)
    assert prepared["kl"].shape == (len(EXAMPLES),) and len(set(prepared["kl"].tolist())) == 1


def test_precomputed_completion_reference_matches_the_same_pass(llama):
    """precompute_reference stores the completions' reference (the KL rows' stays per step: NaN); the loss and
    gradients are those of the same pass."""
    ours, _, pairs = make_models(llama)
    same_pass, _ = our_step(make_objective("kto", recipe()), ours, our_batch())
    grads = {n: p.grad.clone() for n, (p, _) in pairs.items()}
    ours.zero_grad()
    its = items()
    batches = Batches(its, len(its), shuffle=False, pad_id=PAD, drop_last=False)
    objective = make_objective("kto", recipe(precompute_reference=True, micro_batch_size=2))
    objective.setup(ours, None, SimpleNamespace(batches=batches, val_batches=None), torch.device("cpu"))
    assert all(math.isfinite(it.ref_logps[0]) and math.isnan(it.ref_logps[1]) for it in its)
    batch = batches.batch(0, 0)
    assert batch["ref_logps"].shape == (len(its), 2)
    loss, _ = our_step(objective, ours, batch)
    assert loss == pytest.approx(same_pass, rel=1e-6)
    for n, (p, _) in pairs.items():
        assert grad_err(p.grad, grads[n]) <= 1e-6, n


def test_kto_refuses_a_full_fine_tune_even_with_a_precomputed_reference(llama):
    for knobs in ({}, {"precompute_reference": True}):
        with pytest.raises(ConfigError, match="objective kto needs the reference model.*finetune: full"):
            make_objective("kto", recipe(finetune="full", **knobs))
    bare, _ = load_model(llama, torch.float32)
    with pytest.raises(ConfigError, match="no adapter to switch off"):
        make_objective("kto", recipe()).module(bare)
    objective = make_objective("kto")
    assert isinstance(objective, KTOObjective) and objective.data == "unpaired"
    assert objective.weight(our_batch()) == len(EXAMPLES)


def test_a_kto_session_starts_at_one_half_and_moves(ckpt, pairs_file, tmp_path):
    """objective: kto through TrainingSession on a preference file (TRL's unpairing: chosen desirable, rejected
    not): the fresh adapter is the reference, so every log-ratio and the KL are 0 and each loss 1 - sigmoid(0)
    = 0.5; later steps lower it, and evaluation reports KTO's metrics."""
    session = preference_session(ckpt, pairs_file, tmp_path / "run", objective="kto")
    first = session.step()
    assert first.loss == pytest.approx(0.5, abs=1e-6)
    assert abs(first.metrics["kl"]) < 1e-6 and abs(first.metrics["rewards/chosen"]) < 1e-6
    assert set(KTO_METRICS) <= set(first.metrics)
    later = [session.step() for _ in range(3)]
    assert later[-1].loss < first.loss
    assert math.isfinite(session.evaluate())
    measured = set(session.eval_metrics)  # a name nothing was counted for (no undesirable example) is left out
    assert {"kl", "entropy", "rewards/chosen", "logps/chosen"} <= measured <= set(KTO_METRICS)
    assert all(math.isfinite(v) for v in session.eval_metrics.values())
