"""loratune/train/grpo.py: GRPO's loss and gradients equal TRL 1.16's ``GRPOTrainer._compute_loss`` on the same
completions, for every loss_type, with and without the KL, with clip-higher and a policy that moved since the
rollout; the advantages equal TRL's own ``_generate_and_score_completions`` for every scale_rewards; micro-batches
add up to the whole batch's loss.

Then GRPO trains through a TrainingSession (prompts from a JSONL file, rollouts by the engine, rewards from
the recipe), and a run stopped, saved and resumed reaches the adapter of the uninterrupted run bit for bit.

The sampling is ours (tests/train/test_rollout.py), so TRL is given fixed completions: a tiny random Llama
(transformers' config + save_pretrained) loaded here with a LoRA adapter of non-zero B, and the same adapter in
PEFT under a GRPOTrainer built offline (float32, no bf16 autocast, no gradient checkpointing).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_lora_
from family_models import hf_family_model, reinit_decoder_, write_small_tokenizer

from loratune.adapters.lora import LoRAConfig, lora_layers
from loratune.adapters.peft_format import save_adapter
from loratune.adapters.targets import inject_lora
from loratune.dist.world import SINGLE
from loratune.models import load_model
from loratune.recipe import GRPOConfig
from loratune.train.grpo import GRPOObjective, completion_rows, group_advantages
from loratune.train.rollout import Group

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

RTOL = 1e-5
TEMPERATURE = 0.7
PROMPTS = [[5, 17, 33, 40], [8, 9, 10, 11, 12, 13]]
"""Two prompts of different lengths (TRL left-pads the shorter)."""
EOS = 0
COMPLETIONS = [[[51, 52, 53, 54, 55, 56], [61, 62, EOS], [71, 72, 73, 74, EOS]],
               [[81, EOS], [91, 92, 93, 94, 95, 96], [101, 102, 103, EOS]]]
"""Three completions of each prompt: ended by EOS (kept, as TRL keeps it) or truncated at max_new_tokens 6."""
MAX_NEW = 6
ADVANTAGES = torch.tensor([[0.9, -1.2, 0.3], [-0.4, 1.1, -0.7]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with a small real tokenizer, and a LoRA adapter of non-zero A and B saved by loratune."""
    root = tmp_path_factory.mktemp("grpo")
    hf = reinit_decoder_(hf_family_model("llama", num_hidden_layers=2), seed=0, std=0.08)
    with torch.no_grad():  # logits of a few units (log-probs near -6, not -40: float32 keeps more of the ratio)
        hf.model.embed_tokens.weight.mul_(0.2)
    base = root / "base"
    hf.save_pretrained(base)
    write_small_tokenizer(base)
    ours, _ = load_model(base)
    cfg = LoRAConfig(r=4, alpha=8, targets=["q", "v"])
    inject_lora(ours, cfg)
    randomize_lora_(ours, seed=3, std=0.1)
    save_adapter(ours, root / "adapter", cfg, base_model=str(base))
    return SimpleNamespace(base=base, adapter=root / "adapter", lora=cfg)


def _ours(checkpoint):
    from loratune.adapters.peft_format import load_adapter

    model, _ = load_model(checkpoint.base)
    load_adapter(model, checkpoint.adapter)
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    return model.train()


def _trainer(checkpoint, **config):
    """TRL's trainer around the same adapter in PEFT (a dummy reward: the completions are given)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint.base / "tokenizer.json"), eos_token="</s>",
                                        pad_token="</s>")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint.base), checkpoint.adapter,
                                     is_trainable=True)
    args = TRLConfig(output_dir=str(checkpoint.base.parent / "trl"), report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=6, **config)
    trainer = GRPOTrainer(model=peft, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                          train_dataset=Dataset.from_list([{"prompt": "the cat"}] * 6), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer, peft


def _trl_inputs(advantages: torch.Tensor) -> dict:
    """TRL's inputs for the fixed completions: left-padded prompts, right-padded completions."""
    rows = [(p, c) for p, group in zip(PROMPTS, COMPLETIONS) for c in group]
    P, C = max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
    completion_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for _, c in rows])
    return {"prompt_ids": torch.tensor([[EOS] * (P - len(p)) + p for p, _ in rows]),
            "prompt_mask": torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p, _ in rows]),
            "completion_ids": torch.tensor([c + [EOS] * (C - len(c)) for _, c in rows]),
            "completion_mask": completion_mask, "advantages": advantages.flatten(),
            "num_items_in_batch": completion_mask.sum()}


def _to_trl_layout(ours: torch.Tensor) -> torch.Tensor:
    """(B, G, T) per-token values in our layout -> TRL's (B*G, C) completion columns."""
    C = max(len(c) for group in COMPLETIONS for c in group)
    out = torch.zeros(len(PROMPTS) * len(COMPLETIONS[0]), C)
    for b, (prompt, group) in enumerate(zip(PROMPTS, COMPLETIONS)):
        for g, c in enumerate(group):
            out[b * len(group) + g, :len(c)] = ours[b, g, len(prompt) - 1:len(prompt) - 1 + len(c)]
    return out


def _objective(**grpo) -> GRPOObjective:
    cfg = GRPOConfig(**{"group_size": 3, "max_new_tokens": MAX_NEW, "temperature": TEMPERATURE,
                        "rewards": [{"type": "length", "max_words": 3}], **grpo})
    return GRPOObjective(SimpleNamespace(grpo=cfg, seed=0, micro_batch_size=2, precision="fp32"))


def _batch() -> dict[str, torch.Tensor]:
    batch = completion_rows(PROMPTS, [Group(g, [len(c) == MAX_NEW for c in g]) for g in COMPLETIONS], EOS)
    batch["advantages"] = ADVANTAGES
    return batch


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{ab}": next(iter(getattr(layer, f"lora_{ab}").values())).grad
            for name, layer in lora_layers(model) for ab in "AB"}


def _peft_grads(peft) -> dict[str, torch.Tensor]:
    return {f"{name}.{ab}": getattr(m, f"lora_{ab}")["default"].weight.grad
            for name, m in peft.base_model.model.named_modules() if hasattr(m, "lora_A") and hasattr(m.lora_A, "keys")
            for ab in "AB"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = {f"{loss}-beta{beta}": {"loss_type": loss, "beta": beta} for loss in ("grpo", "bnpo", "dr_grpo", "dapo")
         for beta in (0.0, 0.1)}
CASES["dapo-clip-higher-moved"] = {"loss_type": "dapo", "beta": 0.05, "epsilon_high": 0.28, "moved": True}
CASES["grpo-moved"] = {"loss_type": "grpo", "beta": 0.0, "epsilon": 0.1, "moved": True}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_trl(checkpoint, case):
    """Ours and TRL's ``_compute_loss`` on the same completions and advantages: the loss and every LoRA gradient
    to 1e-5 relative. ``moved``: old log-probs that differ from the current ones (as after an update), so the
    ratio is not 1 and both clip ranges cut."""
    knobs = dict(CASES[case])
    moved = knobs.pop("moved", False)
    objective = _objective(**knobs)
    model = _ours(checkpoint)
    batch = _batch()
    if knobs["beta"]:
        batch["ref_logps"] = objective.reference_logps(model, batch, torch.device("cpu"))
    trainer, peft = _trainer(checkpoint, num_generations=3, max_completion_length=MAX_NEW, temperature=TEMPERATURE,
                             **knobs)
    inputs = _trl_inputs(ADVANTAGES)
    if knobs["beta"]:
        inputs["ref_per_token_logps"] = _to_trl_layout(batch["ref_logps"])
    if moved:
        from loratune.train.logps import token_logps

        with torch.no_grad():
            now = token_logps(model, batch["input_ids"].flatten(0, 1), batch["labels"].flatten(0, 1), stats=False,
                              temperature=TEMPERATURE).logps.view_as(batch["labels"]).float()
        shift = torch.randn(now.shape, generator=torch.Generator().manual_seed(1)) * 0.4
        batch["old_logps"] = (now + shift) * (batch["labels"] != -100)
        inputs["old_per_token_logps"] = _to_trl_layout(batch["old_logps"])
    loss = objective.module(model)(**batch) / objective.weight(batch)
    loss.backward()
    expected = trainer._compute_loss(trainer.model, inputs)
    expected.backward()
    assert abs(float(loss) - float(expected)) <= RTOL * abs(float(expected)), (float(loss), float(expected))
    ours, theirs = _lora_grads(model), _peft_grads(peft)
    assert set(ours) == set(theirs) and len(ours) == 8
    worst = max(_rel(ours[k], theirs[k]) for k in ours)
    assert worst <= RTOL, worst
    metrics = objective.sums.take()
    if moved:
        assert metrics["clip_ratio/region_mean"] > 0
        assert metrics["clip_ratio/region_mean"] == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][0],
                                                                  rel=1e-6)
    if knobs["beta"]:
        assert metrics["kl"] == pytest.approx(trainer._metrics["train"]["kl"][0], rel=1e-4)
    assert metrics["entropy"] == pytest.approx(trainer._metrics["train"]["entropy"][0], rel=1e-3)  # a tiny number here


REWARDS = torch.tensor([[1.0, 0.5], [0.0, math.nan], [1.0, 0.2], [0.0, 0.1],
                        [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0],
                        [0.3, 0.0], [0.7, math.nan], [0.1, 0.9], [0.2, 0.4]])
"""Two reward functions (the second None where NaN) over 3 prompts x 4 completions; the middle group has no spread."""


def _table_reward(column: int):
    def reward(completions, row, **_):
        return [None if math.isnan(REWARDS[i, column]) else float(REWARDS[i, column]) for i in row]
    reward.__name__ = f"r{column}"
    return reward


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trls(checkpoint, scale):
    """TRL's own ``_generate_and_score_completions`` (its completions given by a ``rollout_func``, its rewards by two
    weighted functions, one returning None for some) gives the advantages ``group_advantages`` gives, and the reward
    metrics ours log."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint.base / "tokenizer.json"), eos_token="</s>",
                                        pad_token="</s>")
    rows = [{"prompt": "the cat", "row": i} for i in range(12)]

    def rollout(prompts, trainer):
        return {"prompt_ids": [[5, 6, 7]] * len(prompts), "completion_ids": [[8, 9, EOS]] * len(prompts),
                "logprobs": None}

    args = TRLConfig(output_dir=str(checkpoint.base.parent / "trl"), report_to=[], use_cpu=True, bf16=False,
                     num_generations=4, per_device_train_batch_size=12, max_completion_length=4, scale_rewards=scale,
                     reward_weights=[1.0, 0.5])
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(checkpoint.base),
                          reward_funcs=[_table_reward(0), _table_reward(1)], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, rollout_func=rollout)
    out = trainer._generate_and_score_completions(rows)
    advantages, rewards, std = group_advantages(REWARDS, torch.tensor([1.0, 0.5]), 4, scale)
    torch.testing.assert_close(advantages, out["advantages"], rtol=0, atol=0)
    objective = _objective(scale_rewards=scale, group_size=4)
    objective.rewards = [SimpleNamespace(name="r0"), SimpleNamespace(name="r1")]
    objective.measure_rewards(REWARDS, rewards, std, [Group([[1, 2]] * 4, [False] * 4)] * 3, SINGLE)
    ours, theirs = objective.sums.take(), {k: v[0] for k, v in trainer._metrics["eval"].items()}
    for name in ("reward", "reward_std", "frac_reward_zero_std", "rewards/r0/mean", "rewards/r1/mean",
                 "rewards/r0/std", "rewards/r1/std"):
        assert ours[name] == pytest.approx(theirs[name], rel=1e-6), name


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_batch(checkpoint, loss_type):
    """Each prompt's rows alone, each divided by the whole batch's weight, sum to the whole batch's loss (what the
    step does with micro-batches and ranks)."""
    objective = _objective(loss_type=loss_type, beta=0.1)
    model = _ours(checkpoint)
    batch, module = _batch(), objective.module(model)
    batch["advantages"] = batch["advantages"].abs()  # a loss far from 0
    batch["ref_logps"] = objective.reference_logps(model, batch, torch.device("cpu"))
    weight = objective.weight(batch)
    expected = {"grpo": 6, "dr_grpo": 6 * MAX_NEW}.get(loss_type, sum(len(c) for g in COMPLETIONS for c in g))
    assert weight == expected
    with torch.no_grad():
        whole = float(module(**batch)) / weight
        parts = sum(float(module(**{k: v[i:i + 1] for k, v in batch.items()})) for i in range(2)) / weight
    assert parts == pytest.approx(whole, rel=1e-6)


# --- through the session ---------------------------------------------------------------------------------------

RECIPE = """
objective: grpo
grpo:
  group_size: 4
  max_new_tokens: 8
  temperature: 1.0
  beta: 0.05
  rewards:
    - {type: length, max_words: 2}
    - {type: regex, field: answer, pattern: "(garden|park)", weight: 0.5}
finetune: lora
lora: {r: 4, alpha: 8, targets: [q, v], dropout: 0.0}
seq_len: 32
batch_size: 4
max_steps: 4
lr: 5.0e-2
precision: fp32
device: cpu
log_every: 1
eval_every: 0
save_every: 0
eval_batches: 1
sample_tokens: 0
seed: 3
"""


@pytest.fixture(scope="module")
def grpo_recipe(checkpoint, tmp_path_factory):
    import json

    from loratune.recipe import load_recipe

    root = tmp_path_factory.mktemp("grpo-run")
    words = ["cat", "dog", "fox", "bird"]
    places = ["garden", "park", "house", "river"]
    with (root / "prompts.jsonl").open("w") as f:
        for i in range(20):
            f.write(json.dumps({"prompt": f"where does the {words[i % 4]} sleep", "answer": places[i % 3]}) + "\n")
    (root / "recipe.yaml").write_text(RECIPE)
    return load_recipe(root / "recipe.yaml", [f"model={checkpoint.base}", f"data.source={root / 'prompts.jsonl'}",
                                              f"out_dir={root / 'out'}", "data.val_fraction=0.2"])


def _session(recipe):
    from loratune.train import TrainingSession
    from loratune.train.session import resolve_device

    recipe, _ = resolve_device(recipe)
    torch.manual_seed(recipe.seed)
    return TrainingSession.from_recipe(recipe)


def _adapter(session) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}


def test_grpo_trains_through_the_session(grpo_recipe):
    """Prompts from the data file, rollouts with the adapter, rewards and advantages, TRL's loss: the adapter moves,
    the step's metrics hold what TRL logs and the rollout's seconds, evaluation rewards the validation prompts."""
    session = _session(grpo_recipe)
    assert isinstance(session.objective, GRPOObjective) and len(session.objective.records) == 20
    start = _adapter(session)
    results = [session.step() for _ in range(3)]
    assert all(math.isfinite(r.loss) and math.isfinite(r.grad_norm) for r in results)
    metrics = results[-1].metrics
    for name in ("reward", "reward_std", "rewards/length/mean", "rewards/regex/mean", "frac_reward_zero_std",
                 "completions/mean_length", "completions/clipped_ratio", "kl", "entropy", "clip_ratio/region_mean",
                 "rollout_s", "score_s"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert 1 <= metrics["completions/mean_length"] <= 8 and metrics["rollout_s"] > 0
    assert any(r.grad_norm > 0 for r in results)
    assert any(not torch.equal(start[n], p) for n, p in _adapter(session).items())
    assert session.model.training
    val = session.evaluate()
    assert math.isfinite(val) and "reward" in session.eval_metrics
    assert session.evaluate() == val, "evaluation samples with a fixed seed"


def test_grpo_on_gpt2_with_its_tokenizer(ckpt, grpo_recipe):
    """The tiny GPT-2 of ``loratune init-model`` with GPT-2's real tokenizer (50,257 tokens, EOS <|endoftext|>):
    completions decode to text, a length band rewards some, and two steps move the adapter."""
    recipe = dataclasses.replace(grpo_recipe, model=str(ckpt), lora=dataclasses.replace(grpo_recipe.lora,
                                                                                       targets=["c_attn"]),
                                 grpo=dataclasses.replace(grpo_recipe.grpo, beta=0.0,
                                                          rewards=[{"type": "length", "max_words": 6}]))
    session = _session(recipe)
    assert session.objective.sampler.stops == [50256]
    start = _adapter(session)
    results = [session.step() for _ in range(2)]
    assert 0 < sum(r.metrics["reward"] for r in results) < 2 and any(r.grad_norm > 0 for r in results)
    assert any(not torch.equal(start[n], p) for n, p in _adapter(session).items())
    (group,) = session.objective.sampler.sample(session.model, [session.tokenizer.encode("where does the cat")],
                                                [0], step=0)
    assert all(session.tokenizer.decode(t).strip() for t in group.tokens)


def test_a_recipe_without_rewards_is_refused_at_setup(grpo_recipe):
    from loratune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"objective grpo needs reward functions, and grpo.rewards is empty: write "
                                          r"e.g. grpo.rewards: \[\{type: exact, field: answer\}\]"):
        _session(dataclasses.replace(grpo_recipe, grpo=dataclasses.replace(grpo_recipe.grpo, rewards=[])))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_do_not_change_the_step(grpo_recipe, loss_type):
    """grad_accum 2 (two prompts at a time) takes the step grad_accum 1 takes: the same loss and adapter."""
    one, two = (_session(dataclasses.replace(grpo_recipe, grad_accum=k, grpo=dataclasses.replace(
        grpo_recipe.grpo, loss_type=loss_type))) for k in (1, 2))
    a, b = one.step(), two.step()
    assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-9) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert a.grad_norm > 0
    first, second = _adapter(one), _adapter(two)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-7)


def test_a_resumed_run_reaches_the_same_adapter(grpo_recipe, tmp_path):
    """2 steps, save, a new session resumes and takes 2 more: the adapter of 4 uninterrupted steps, bit for bit
    (the rollouts depend on the seeds and the step, not on any RNG state)."""
    straight = _session(grpo_recipe)
    losses = [straight.step().loss for _ in range(4)]
    first = _session(grpo_recipe)
    first.step(), first.step()
    first.save(tmp_path / "checkpoints")
    torch.manual_seed(999)  # another RNG state: nothing depends on it
    again = _session(grpo_recipe)
    again.resume(tmp_path / "checkpoints")
    assert [again.step().loss for _ in range(2)] == losses[2:]
    ours, expected = _adapter(again), _adapter(straight)
    assert all(torch.equal(ours[n], expected[n]) for n in expected)


def _rank(rank: int, port: int, results) -> None:
    """One of two gloo ranks: the batch-scaled advantages and the reward metrics of its two groups."""
    import torch.distributed as dist

    from loratune.dist.world import World

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        world = World(rank=rank, size=2, distributed=True)
        mine = REWARDS[rank * 6:(rank + 1) * 6]
        advantages, rewards, std = group_advantages(mine, torch.tensor([1.0, 0.5]), 3, "batch", world)
        objective = _objective(scale_rewards="batch")
        objective.rewards = [SimpleNamespace(name="r0"), SimpleNamespace(name="r1")]
        objective.measure_rewards(mine, rewards, std, [Group([[1, 2]] * 3, [False] * 3)] * 2, world)
        results.put((rank, advantages, objective.sums.take(world)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batch_scaled_advantages_and_metrics_over_two_ranks_equal_one_process():
    """scale_rewards: batch divides by the std of every rank's rewards, and the logged reward_std, rewards/<f>/std
    are those of the whole batch (two gloo processes, each with two groups of three)."""
    import multiprocessing

    from conftest import free_port

    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {rank: (adv, metrics) for rank, adv, metrics in (results.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    advantages, rewards, std = group_advantages(REWARDS, torch.tensor([1.0, 0.5]), 3, "batch")
    torch.testing.assert_close(torch.cat([got[0][0], got[1][0]]), advantages, rtol=1e-6, atol=1e-7)
    objective = _objective(scale_rewards="batch")
    objective.rewards = [SimpleNamespace(name="r0"), SimpleNamespace(name="r1")]
    objective.measure_rewards(REWARDS, rewards, std, [Group([[1, 2]] * 3, [False] * 3)] * 4, SINGLE)
    one = objective.sums.take()
    assert got[0][1] == got[1][1] and got[0][1].keys() == one.keys()
    for name, value in one.items():
        assert got[0][1][name] == pytest.approx(value, rel=1e-6), name


def test_prompts_and_completions_past_the_context_are_refused_at_setup(grpo_recipe):
    """seq_len bounds the prompts; with max_new_tokens after them they must fit the model's context (256 here)."""
    from loratune.errors import ConfigError

    recipe = dataclasses.replace(grpo_recipe, seq_len=250, grpo=dataclasses.replace(grpo_recipe.grpo, max_new_tokens=8))
    with pytest.raises(ConfigError, match=r"seq_len=250 tokens and grpo.max_new_tokens=8 .* context of 256 tokens"):
        _session(recipe)
