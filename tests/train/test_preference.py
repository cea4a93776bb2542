"""loratune/train/preference.py: dpo, ipo, orpo and simpo give TRL 1.16's loss, adapter gradients and logged
metrics on the same tiny Llama with the same LoRA weights (ours loaded through loratune, TRL's a PEFT model
on transformers' model), through the real trainers' loss code; the reference is the base with the adapter
off, in the same pass or precomputed; a zero adapter starts DPO at ln 2; a full fine-tune is refused."""

from __future__ import annotations

import math
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from loratune.adapters.lora import LoRAConfig
from loratune.adapters.targets import inject_lora
from loratune.errors import ConfigError
from loratune.models import load_model
from loratune.recipe import PreferenceConfig
from loratune.train.objective import make_objective
from loratune.train.preference import PairObjective

VOCAB, PAD = 128, 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL = 1e-5

# (prompt, chosen, rejected) token ids: prompts and completions of different lengths, so rows are padded
PAIRS = [([5, 9, 14, 3], [20, 21, 22, 2], [30, 2]),
         ([7, 8], [40, 41, 42, 43, 44, 2], [50, 51, 52, 2]),
         ([11, 12, 13, 14, 15], [60, 2], [70, 71, 72, 2]),
         ([16, 17, 18], [80, 81, 2], [90, 91, 92, 93, 94, 95, 2])]


# --- the tiny model, ours and PEFT's with the same adapter -------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # weights large enough that log-probs differ clearly between tokens
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    word = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word, pad_token="t0", bos_token="t1", eos_token="t2",
                            unk_token="t3").save_pretrained(path)
    return path


def _peft_name(ours: str) -> str:
    """model.layers.0.self_attn.q_proj.lora.default.lora_A.all -> PEFT's key of the same matrix."""
    module, kind = re.fullmatch(r"(.*)\.lora\.default\.(lora_[AB])\.all", ours).groups()
    return f"base_model.model.{module}.{kind}.default.weight"


def make_models(llama, seed: int = 1, scale: float = 0.3):
    """Ours (loratune's loader + LoRA r=4 on every projection) and PEFT's on transformers' model, both in
    train mode, with the same A and B (B random: the policy is not the reference; ``scale`` 0: B = 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # A's initialisation
    ours, _ = load_model(llama, torch.float32)
    inject_lora(ours, LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=TARGETS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32),
                              LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    theirs = dict(peft.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, p in ours.named_parameters():
        p.requires_grad_(".lora." in name)
        if ".lora." not in name:
            continue
        q = theirs[_peft_name(name)]
        assert q.shape == p.shape, name
        with torch.no_grad():
            if ".lora_B." in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            q.copy_(p)
        pairs[name] = (p, q)
    assert len(pairs) == 2 * len(TARGETS) * 2  # A and B of 7 projections in 2 layers
    return ours.train(), peft.train(), pairs


# --- batches: ours (the data contract) and TRL's collations of the same pairs -------------------------------

def our_batch(pairs=PAIRS) -> dict[str, torch.Tensor]:
    """input_ids/labels (B, 2, T): seq[:-1] / seq[1:], labels -100 on the prompt and the padding."""
    seqs = [[p + c, p + r] for p, c, r in pairs]
    t = max(len(s) for row in seqs for s in row) - 1
    x = torch.full((len(pairs), 2, t), PAD, dtype=torch.long)
    y = torch.full((len(pairs), 2, t), -100, dtype=torch.long)
    for i, (prompt, *_) in enumerate(pairs):
        for k, seq in enumerate(seqs[i]):
            x[i, k, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[i, k, len(prompt) - 1:len(seq) - 1] = torch.tensor(seq[len(prompt):])
    return {"input_ids": x, "labels": y}


def legacy_batch(pairs=PAIRS) -> dict[str, torch.Tensor]:
    """ORPOTrainer/CPOTrainer's collated batch: chosen_/rejected_ input_ids, attention_mask, labels."""
    out = {}
    for k, side in ((1, "chosen"), (2, "rejected")):
        seqs = [p[0] + p[k] for p in pairs]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(pairs), n), PAD, dtype=torch.long)
        mask = torch.zeros((len(pairs), n), dtype=torch.long)
        labels = torch.full((len(pairs), n), -100, dtype=torch.long)
        for i, (p, s) in enumerate(zip(pairs, seqs)):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            labels[i, len(p[0]):len(s)] = torch.tensor(s[len(p[0]):])
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return out


def recipe(finetune: str = "lora", micro_batch_size: int = 4, **knobs):
    return SimpleNamespace(preference=PreferenceConfig(**knobs), finetune=finetune,
                           micro_batch_size=micro_batch_size)


def our_step(objective, model, batch, micro: int | None = None):
    """The step's arithmetic (step._objective_losses on one rank): prepare, each micro-batch's summed loss over
    the batch's weight, backward; returns the loss and the metrics."""
    with torch.no_grad():
        batch = objective.prepare(model, batch, 0)
    module, n = objective.module(model), objective.weight(batch)
    rows = batch["input_ids"].shape[0]
    size = micro or rows
    loss = 0.0
    for i in range(0, rows, size):
        part = module(**{k: v[i:i + size] for k, v in batch.items()}) / n
        part.backward()
        loss += float(part.detach())
    return loss, objective.sums.take()


# --- comparisons ---------------------------------------------------------------------------------------------

def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-6)


def grad_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error of a whole gradient tensor (its norm: single elements near 0 carry fp32 noise)."""
    return float((got - expected).norm() / expected.norm().clamp(min=1e-12))


def assert_grads_match(pairs):
    for name, (p, q) in pairs.items():
        assert p.grad is not None and q.grad is not None, name
        assert grad_err(p.grad, q.grad) <= RTOL, (name, grad_err(p.grad, q.grad))
    assert any(float(p.grad.abs().max()) > 0 for n, (p, _) in pairs.items() if ".lora_A." in n)  # B != 0


def assert_metrics_match(ours: dict[str, float], theirs: dict[str, float], names):
    for name in names:
        assert rel(ours[name], theirs[name]) <= RTOL, (name, ours[name], theirs[name])


def dpo_trainer(peft, tokenizer_dir, **config):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_dict({"prompt": ["t5 t6"], "chosen": [" t7"], "rejected": [" t8"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=peft, args=DPOConfig(output_dir=str(tokenizer_dir / "trl"), report_to=[],
                                                        use_cpu=True, bf16=False, disable_tqdm=True, **config),
                             train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(tokenizer_dir))
    return base_as_reference(trainer)


def base_as_reference(trainer):
    """TRL handed a PEFT model whose adapter is not zero copies it as a frozen "ref" adapter (re-training an
    existing adapter); ours is one trained from zero in this run, whose reference is the base: drop the copy,
    so that TRL's reference is its adapters-disabled model, as for an adapter it created itself."""
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    return trainer


def trl_dpo(peft, llama, **config):
    """TRL's DPOTrainer.compute_loss on PAIRS (its collator), backward; returns the loss and its metrics."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer = dpo_trainer(peft, llama, **config)
    inputs = DataCollatorForPreference(pad_token_id=PAD)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss.detach()), {k: v[-1] for k, v in trainer._metrics["train"].items()}


DPO_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]


@pytest.mark.parametrize("name, knobs, trl_config", [
    ("dpo", {}, {}),
    ("dpo", {"beta": 0.5, "loss_type": "robust", "label_smoothing": 0.2},
     {"beta": 0.5, "loss_type": ["robust"], "label_smoothing": 0.2}),
    ("dpo", {"beta": 0.3, "loss_type": "hinge"}, {"beta": 0.3, "loss_type": ["hinge"]}),
    ("dpo", {"sft_weight": 0.7}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}),
    ("ipo", {"beta": 0.2}, {"beta": 0.2, "loss_type": ["ipo"]}),
], ids=["sigmoid", "robust", "hinge", "rpo", "ipo"])
def test_dpo_family_matches_trl(llama, name, knobs, trl_config):
    ours, peft, pairs = make_models(llama)
    expected, trl_metrics = trl_dpo(peft, llama, **trl_config)
    loss, metrics = our_step(make_objective(name, recipe(**knobs)), ours, our_batch())
    assert rel(loss, expected) <= RTOL, (loss, expected)
    assert_grads_match(pairs)
    assert_metrics_match(metrics, trl_metrics, DPO_METRICS)
    assert metrics["rewards/margins"] != 0 and 0 < metrics["rewards/accuracies"] < 1  # not a degenerate batch


def test_cdpo_label_smoothing_is_the_smoothed_sigmoid(llama):
    """TRL 1.16's sigmoid has no label smoothing; cDPO is the loss TRL computed before (and CPO still does):
    (1 - e) * -log sigmoid(z) + e * -log sigmoid(-z), checked here against the plain loss's pieces."""
    ours, _, _ = make_models(llama)
    plain, smoothed = make_objective("dpo", recipe()), make_objective("dpo", recipe(label_smoothing=0.25))
    batch = our_batch()
    with torch.no_grad():
        base = float(plain.module(ours)(**batch)) / 4
        margins = plain.sums.take()["rewards/margins"]
        got = float(smoothed.module(ours)(**batch)) / 4
    assert got != pytest.approx(base, rel=1e-3)
    # per pair z = margin_i; rebuild it from the per-pair losses of a one-pair batch each
    total = 0.0
    for i in range(len(PAIRS)):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        with torch.no_grad():
            plain.module(ours)(**one)
        z = plain.sums.take()["rewards/margins"]
        total += 0.75 * -F.logsigmoid(torch.tensor(z)) + 0.25 * -F.logsigmoid(torch.tensor(-z))
    assert got == pytest.approx(float(total) / len(PAIRS), rel=1e-6)
    assert margins != 0


def assert_micro_batches_agree(objective, ours, pairs, batch) -> tuple[dict, dict]:
    """The step on ``batch`` whole and in micro-batches of 2: the same loss and gradients (1e-6); returns both
    steps' metrics."""
    whole, metrics = our_step(objective, ours, batch)
    grads = {n: p.grad.clone() for n, (p, _) in pairs.items()}
    ours.zero_grad()
    split, split_metrics = our_step(objective, ours, batch, micro=2)
    assert split == pytest.approx(whole, rel=1e-6)
    for n, (p, _) in pairs.items():
        assert grad_err(p.grad, grads[n]) <= 1e-6, n
    return metrics, split_metrics


def test_dpo_with_micro_batches_is_the_one_batch_loss(llama):
    """The sigmoid loss is a mean over pairs: two micro-batches of 2 give the one-batch loss and gradients."""
    ours, _, pairs = make_models(llama)
    metrics, split_metrics = assert_micro_batches_agree(make_objective("dpo", recipe()), ours, pairs, our_batch())
    for k in ("rewards/chosen", "rewards/margins", "logps/rejected", "logits/chosen"):
        assert split_metrics[k] == pytest.approx(metrics[k], rel=1e-6)


def test_a_zero_adapter_starts_dpo_at_ln2(llama):
    """B = 0: policy = reference, so every reward is 0 and the loss ln 2: exactly without gradients (as in
    evaluation); in a training pass to fp32 rounding (with gradients the CPU attention takes another kernel)."""
    ours, _, _ = make_models(llama, scale=0.0)
    objective = make_objective("dpo", recipe())
    with torch.no_grad():
        loss = float(objective.module(ours)(**our_batch())) / len(PAIRS)
    metrics = objective.sums.take()
    assert loss == pytest.approx(math.log(2), rel=1e-7)
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0
    assert metrics["rewards/accuracies"] == 0  # TRL's strict chosen > rejected
    loss, metrics = our_step(objective, ours, our_batch())
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics["rewards/margins"]) < 1e-5 * objective.config.beta * 10


def test_precomputed_reference_matches_the_same_pass(llama):
    """setup() with precompute_reference stores each item's reference log-probs (in micro-batches of 3 items);
    the batch's ref_logps then give the loss and gradients of the reference computed in the step's pass."""
    from loratune.data import Batches
    from loratune.data.preference_items import PairItem

    items = [PairItem(p, c, r, limit=64) for p, c, r in PAIRS]
    batches = Batches(items, len(items), shuffle=False, pad_id=PAD, drop_last=False)
    assert all(torch.equal(batches.batch(0, 0)[k], v) for k, v in our_batch().items())  # the data contract
    ours, _, pairs = make_models(llama)
    same_pass, metrics = our_step(make_objective("dpo", recipe()), ours, our_batch())
    grads = {n: p.grad.clone() for n, (p, _) in pairs.items()}
    ours.zero_grad()
    objective = make_objective("dpo", recipe(precompute_reference=True, micro_batch_size=3))
    val = Batches(items[:1], 1, shuffle=False, pad_id=PAD, drop_last=False)
    objective.setup(ours, None, SimpleNamespace(batches=batches, val_batches=val), torch.device("cpu"))
    assert all(isinstance(it.ref_logps, tuple) and len(it.ref_logps) == 2 for it in items)
    assert len({v for it in items for v in it.ref_logps}) == 2 * len(items)
    batch = batches.batch(0, 0)
    assert batch["ref_logps"].shape == (len(PAIRS), 2) and batch["ref_logps"].dtype == torch.float32
    precomputed, pre_metrics = our_step(objective, ours, batch)
    assert precomputed == pytest.approx(same_pass, rel=1e-6)
    for n, (p, _) in pairs.items():
        assert grad_err(p.grad, grads[n]) <= 1e-6, n
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert pre_metrics[k] == pytest.approx(metrics[k], abs=1e-6)  # beta x fp32 rounding of log-probs ~ -30


@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_reference_objectives_refuse_a_full_fine_tune(llama, name):
    """A full fine-tune has no adapter to switch off for the reference: refused, naming the fixes; a
    precomputed reference (the starting weights) is accepted."""
    with pytest.raises(ConfigError, match=f"objective {name} needs the reference model.*finetune: full.*"
                                          "precompute_reference: true"):
        make_objective(name, recipe(finetune="full"))
    make_objective(name, recipe(finetune="full", precompute_reference=True))
    bare, _ = load_model(llama, torch.float32)
    with pytest.raises(ConfigError, match="no adapter to switch off"):
        make_objective(name, recipe()).module(bare)
    for free in ("orpo", "simpo"):  # no reference: a full fine-tune is fine
        assert isinstance(make_objective(free, recipe(finetune="full")).module(bare), torch.nn.Module)


def test_a_full_fine_tune_trains_dpo_on_a_precomputed_reference(llama):
    """Without adapters, precompute_reference takes the starting weights as the reference: the first loss is
    ln 2 (policy = reference); a batch without ref_logps is refused rather than scored against itself."""
    from loratune.data import Batches
    from loratune.data.preference_items import PairItem

    model, _ = load_model(llama, torch.float32)
    objective = make_objective("dpo", recipe(finetune="full", precompute_reference=True))
    items = [PairItem(p, c, r, limit=64) for p, c, r in PAIRS]
    batches = Batches(items, len(items), shuffle=False, pad_id=PAD, drop_last=False)
    objective.setup(model, None, SimpleNamespace(batches=batches, val_batches=None), torch.device("cpu"))
    with torch.no_grad():
        loss = float(objective.module(model)(**batches.batch(0, 0))) / len(items)
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ConfigError, match="no precomputed ref_logps"):
        objective.module(model)(**our_batch())


# --- orpo and simpo against TRL's ORPOTrainer and CPOTrainer -------------------------------------------------

def legacy_trainer(kind: str, peft, llama, **config):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cls, cfg = {"orpo": (ORPOTrainer, ORPOConfig), "cpo": (CPOTrainer, CPOConfig)}[kind]
    ds = Dataset.from_dict({"prompt": ["t5 t6"], "chosen": [" t7"], "rejected": [" t8"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=peft, args=cfg(output_dir=str(llama / "trl"), report_to=[], use_cpu=True, bf16=False,
                                        disable_tqdm=True, max_length=64, **config),
                   train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(llama))


PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss"]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(llama, beta):
    ours, peft, pairs = make_models(llama)
    trainer = legacy_trainer("orpo", peft, llama, beta=beta)
    expected, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, legacy_batch())
    expected.backward()
    expected = expected.detach()
    loss, metrics = our_step(make_objective("orpo", recipe(beta=beta)), ours, our_batch())
    assert rel(loss, float(expected)) <= RTOL, (loss, float(expected))
    assert_grads_match(pairs)
    assert_metrics_match(metrics, trl_metrics, PAIR_METRICS + ["log_odds_ratio", "log_odds_chosen"])


@pytest.mark.parametrize("knobs", [{"beta": 2.0},
                                   {"beta": 2.5, "gamma_beta_ratio": 0.3, "sft_weight": 0.4, "label_smoothing": 0.1}],
                         ids=["simpo", "cpo-alpha"])
def test_simpo_matches_trl(llama, knobs):
    ours, peft, pairs = make_models(llama)
    trainer = legacy_trainer("cpo", peft, llama, loss_type="simpo", beta=knobs["beta"],
                             simpo_gamma=knobs.get("gamma_beta_ratio", 0.5) * knobs["beta"],
                             cpo_alpha=knobs.get("sft_weight", 0.0), label_smoothing=knobs.get("label_smoothing", 0.0))
    expected, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, legacy_batch())
    expected.backward()
    expected = expected.detach()
    loss, metrics = our_step(make_objective("simpo", recipe(**knobs)), ours, our_batch())
    assert rel(loss, float(expected)) <= RTOL, (loss, float(expected))
    assert_grads_match(pairs)
    names = PAIR_METRICS if knobs.get("sft_weight") else PAIR_METRICS[:-1]
    assert_metrics_match(metrics, trl_metrics, names)
    if not knobs.get("sft_weight"):
        assert metrics["nll_loss"] == trl_metrics["nll_loss"] == 0  # published SimPO: no NLL term


@pytest.mark.parametrize("kind, name", [("orpo", "orpo"), ("cpo", "simpo")])
def test_all_position_logits_follow_trl(llama, kind, name):
    """ORPO and CPO log the mean of every logit of the chosen/rejected rows, prompt and padding included. On
    rows of one length (no padding, where TRL's attention mask and our causal rows would differ) ORPO's is
    TRL's; CPO's also averages the position after each row's last token, which loratune's rows (seq[:-1]) do
    not have, so ours is TRL's rule over the positions we have (checked on transformers' logits)."""
    same = [([5, 9], [20, 21, 2], [30, 31, 2]), ([7, 8], [40, 41, 2], [50, 51, 2])]
    ours, peft, _ = make_models(llama)
    trainer = legacy_trainer(kind, peft, llama, **({"loss_type": "simpo"} if kind == "cpo" else {}))
    batch = legacy_batch(same)
    with torch.no_grad():
        _, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        objective = make_objective(name, recipe())
        objective.module(ours)(**our_batch(same))
        if kind == "cpo":  # TRL's mean without the last position
            for side in ("chosen", "rejected"):
                logits = peft(batch[f"{side}_input_ids"]).logits[:, :-1]
                trl_metrics[f"logits/{side}"] = float(logits.mean())
    metrics = objective.sums.take()
    for side in ("chosen", "rejected"):
        key = f"logits/{side}"
        assert rel(metrics[key], trl_metrics[key]) <= RTOL, (key, metrics[key], trl_metrics[key])


def test_pair_objectives_are_registered_for_pairs():
    for name in ("dpo", "ipo", "orpo", "simpo"):
        objective = make_objective(name)
        assert isinstance(objective, PairObjective) and objective.data == "pairs" and not objective.lm_batches
        assert objective.reference == (name in ("dpo", "ipo"))
        assert objective.config == PreferenceConfig()
        assert objective.weight(our_batch()) == len(PAIRS)


# --- through a training session -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    import json
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(40):
            a, b = rng.sample(["cat", "dog", "fox", "bird", "horse"], 2)
            f.write(json.dumps({"prompt": f"where does the {a} sleep?", "chosen": f" in the {b} house.",
                                "rejected": f" the {a} does not sleep at all, ever"}) + "\n")
    return path


def preference_session(ckpt, pairs_file, out, *overrides, objective: str = "dpo"):
    """A TrainingSession of ``objective`` on the pairs file (the tiny GPT-2, fp32, fresh adapter: B = 0)."""
    from test_train import make_recipe

    from loratune.train import TrainingSession
    from loratune.train.session import resolve_device

    recipe, _ = resolve_device(make_recipe(ckpt, pairs_file, out, f"objective={objective}", "lora.dropout=0",
                                           "grad_accum=2", *overrides))
    torch.manual_seed(recipe.seed)
    return TrainingSession.from_recipe(recipe)


def test_a_dpo_session_starts_at_ln2_and_moves(ckpt, pairs_file, tmp_path):
    """objective: dpo through TrainingSession: the fresh adapter (B = 0) is the reference, so the first step's
    loss is ln 2 and its rewards 0; the next steps move them, and evaluation reports TRL's metrics. A
    precomputed reference takes the same steps."""
    session = preference_session(ckpt, pairs_file, tmp_path / "a")
    first = session.step()
    assert first.loss == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first.metrics["rewards/margins"]) < 1e-6 and first.metrics["rewards/accuracies"] == 0
    assert set(DPO_METRICS) <= set(first.metrics)
    later = [session.step() for _ in range(3)]
    assert later[-1].loss < first.loss and later[-1].metrics["rewards/margins"] > 0
    val = session.evaluate()
    assert math.isfinite(val) and set(DPO_METRICS) <= set(session.eval_metrics)
    pre = preference_session(ckpt, pairs_file, tmp_path / "b", "preference.precompute_reference=true")
    assert all(it.ref_logps is not None for it in pre.data.batches.examples)
    again = [pre.step() for _ in range(4)]
    for ours, theirs in zip(again, [first, *later]):
        assert ours.loss == pytest.approx(theirs.loss, rel=1e-5, abs=1e-6)
        assert ours.metrics["rewards/margins"] == pytest.approx(theirs.metrics["rewards/margins"], abs=1e-5)
