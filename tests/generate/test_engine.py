"""loratune/generate/engine.py: continuous batching with per-row adapters gives every request, token for token,
what greedy ``generate`` gives it alone with its adapter; with more requests than slots (queueing, slots
reused), prompts of different lengths (rows shifted right for a longer newcomer) and a short cache (the time
axis compacted), stop tokens, cancellation and refusals."""

from __future__ import annotations

import random

import pytest
import torch
from family_models import MIXED_ADAPTERS, banked_family, generate_alone

from loratune.adapters.rows import row_banks
from loratune.errors import ConfigError
from loratune.generate import SamplingConfig
from loratune.generate.engine import Engine, Request

ADAPTERS = MIXED_ADAPTERS
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return banked_family(tmp_path_factory.mktemp("engine"))


def alone(model, request: Request) -> list[int]:
    """What greedy generate gives this request with its adapter alone (up to its first stop token)."""
    return generate_alone(model, request.prompt, request.adapter, request.sampling, request.stop_ids)


def run(engine: Engine, requests: list[Request], submit_every: int = 1,
        lengths: list[int] | None = None) -> dict[int, list[int]]:
    """Submit the requests a few at a time between steps (new ones join running rows); returns the answers
    (and records the cache's time axis after each step in ``lengths``)."""
    answers, pending, steps = {}, list(requests), 0
    while pending or engine.busy():
        if pending and steps % submit_every == 0:
            engine.submit(pending.pop(0))
        _, finished = engine.step()
        if lengths is not None:
            lengths.append(engine.cache.length)
        answers.update({f.request.id: f.tokens for f in finished})
        steps += 1
        assert steps < 2000
    return answers


def _requests(n: int, seed: int, max_new: int = 10, stop_ids=()) -> list[Request]:
    rng = random.Random(seed)
    names = [None, *ADAPTERS]
    return [Request([rng.randrange(256) for _ in range(rng.randint(2, 14))], names[i % len(names)],
                    SamplingConfig(max_new_tokens=rng.randint(3, max_new), temperature=0.0), stop_ids)
            for i in range(n)]


def test_sixteen_requests_over_four_adapters_and_the_base_equal_each_alone(served):
    requests = _requests(16, seed=0)
    engine = Engine(served, max_batch=6)
    answers = run(engine, requests)
    assert len(answers) == 16
    for r in requests:
        assert answers[r.id] == alone(served, r), (r.adapter, r.prompt)
    assert len({tuple(answers[r.id]) for r in requests}) > 8  # not one degenerate answer
    assert engine.free_slots() == 6 and not engine.mask.any()  # every slot freed


def test_a_short_cache_is_compacted_and_answers_stay_exact(served):
    requests = _requests(12, seed=1, max_new=12)
    engine = Engine(served, max_batch=3, max_len=30)
    lengths, compactions, compact = [], [], engine._compact
    engine._compact = lambda: (compactions.append(engine.cache.length), compact())
    answers = run(engine, requests, submit_every=2, lengths=lengths)
    assert max(lengths) == 30 and compactions and set(compactions) == {30}  # full, then compacted
    for r in requests:
        assert answers[r.id] == alone(served, r), (r.adapter, r.prompt)


def test_stop_tokens_end_a_row_and_the_others_go_on(served):
    probe = _requests(6, seed=2, max_new=12)
    free = run(Engine(served, max_batch=4), probe)
    stop = free[probe[1].id][2]  # a token request 1 produces third: with it as a stop id, request 1 ends early
    requests = _requests(6, seed=2, max_new=12, stop_ids=(stop,))
    answers = run(Engine(served, max_batch=4), requests)
    assert answers[requests[1].id] == free[probe[1].id][:free[probe[1].id].index(stop)]
    for r in requests:
        assert answers[r.id] == alone(served, r)


def test_cancel_frees_the_slot_and_refusals_are_clear(served):
    engine = Engine(served, max_batch=2)
    a, b = _requests(2, seed=3)
    engine.submit(a)
    engine.submit(b)
    engine.step()  # both admitted (within the step's prefill budget)
    assert engine.free_slots() == 0 and engine.cancel(a.id) and engine.free_slots() == 1
    assert engine.running() == 1 and engine.rows[0].request is b  # the running row moved to the first slot
    assert engine.cancel(b.id) and not engine.busy() and not engine.cancel(12345)
    with pytest.raises(ConfigError, match="exceeds the context"):
        engine.submit(Request(list(range(10)), None, SamplingConfig(max_new_tokens=10_000)))
    with pytest.raises(ConfigError, match="empty"):
        engine.submit(Request([], None))
    with pytest.raises(ConfigError, match="'missing' is not loaded .loaded: a, b, dora, qonly"):
        engine.submit(Request([1, 2], "missing", SamplingConfig(max_new_tokens=2)))


def test_prompts_prefilled_together_left_padded_and_long_ones_in_chunks_stay_exact(served):
    requests = _requests(14, seed=4)
    rng = random.Random(5)
    for i in (3, 9):  # two prompts longer than the step's budget of 20 prompt tokens: prefilled in chunks
        requests[i].prompt = [rng.randrange(256) for _ in range(45)]
    engine = Engine(served, max_batch=5, prefill_tokens=20)
    log = PrefillLog(engine)
    for r in requests:
        engine.submit(r)
    answers = {}
    while engine.busy():
        log.steps.append([])
        answers.update({f.request.id: f.tokens for f in engine.step()[1]})
    assert all(sum(n for _, n in step) <= 20 for step in log.steps)  # the budget holds every step
    chunks = [n for step in log.steps for kind, n in step if kind == "chunk"]
    assert sum(chunks) == 90 and len(chunks) >= 6  # both long prompts, each in at least three chunks
    assert any(len(set(lengths)) > 1 for lengths in log.groups)  # prompts of different lengths, one forward
    for r in requests:
        assert answers[r.id] == alone(served, r), (r.adapter, r.prompt)


class PrefillLog:
    """What each step of ``engine`` prefilled: ("group", tokens) per forward of whole prompts, ("chunk", tokens)
    per chunk of a long one (a step is a list: append one before each step)."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[list[tuple[str, int]]] = []
        self.groups: list[list[int]] = []
        self.prefill, self.chunk = engine._prefill, engine._continue_partial
        engine._prefill, engine._continue_partial = self._prefill, self._chunk

    def _prefill(self, group, *args):
        self.groups.append([len(r.prompt) for r in group])
        self.steps[-1].append(("group", sum(self.groups[-1])))
        return self.prefill(group, *args)

    def _chunk(self, *args):
        n = self.chunk(*args)
        self.steps[-1].append(("chunk", n))
        return n


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_models_are_served_exactly(tmp_path, family):
    model = banked_family(tmp_path, family)
    window = model.config.sliding_window
    requests = _requests(10, seed=6, max_new=12)
    assert max(len(r.prompt) + r.sampling.max_new_tokens for r in requests) > window  # the window matters
    answers = run(Engine(model, max_batch=4, max_len=40), requests, submit_every=2)
    for r in requests:
        assert answers[r.id] == alone(model, r), (r.adapter, r.prompt)


@pytest.mark.parametrize("family, overrides, adapter_targets, switch", [
    ("phi3-longrope", {}, ["qkv_proj", "o_proj"], 32),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ["q_proj", "v_proj"], 256)])
def test_length_dependent_rope_is_served_within_its_switch_only(tmp_path, family, overrides, adapter_targets, switch):
    """longrope and dynamic NTK compute their frequencies from the batch's longest sequence: rows of one batch
    would change each other's answers past the switch, so the engine serves them up to it."""
    model = banked_family(tmp_path, family, {"p": dict(r=4, lora_alpha=8.0, target_modules=adapter_targets)},
                          **overrides)
    with pytest.raises(ConfigError, match=f"--max-model-len {switch} or less"):
        Engine(model, max_batch=2)
    requests = [Request(r.prompt, r.adapter and "p", r.sampling) for r in _requests(6, seed=7)]
    answers = run(Engine(model, max_batch=3, max_len=switch), requests)
    for r in requests:
        assert answers[r.id] == alone(model, r), (r.adapter, r.prompt)


def test_a_row_that_fails_ends_alone(served):
    """A row whose logits are not finite cannot be sampled: it ends with an error, the rows beside it go on."""
    banks = row_banks(served)
    bank, slot = next(iter(banks.banks.values())), banks.slot_of["b"]
    saved = bank.B[slot].clone()
    bank.B[slot] = float("nan")
    try:
        requests = _requests(5, seed=8)
        requests[2] = Request(requests[2].prompt, "b", SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3))
        engine = Engine(served, max_batch=5)
        for r in requests:
            engine.submit(r)
        done = {}
        while engine.busy():
            done.update({f.request.id: f for f in engine.step()[1]})
    finally:
        bank.B[slot] = saved
    assert done[requests[2].id].reason == "error" and "sampling failed" in done[requests[2].id].error
    for r in requests[:2] + requests[3:]:
        assert done[r.id].reason != "error" and done[r.id].tokens == alone(served, r)
    assert engine.free_slots() == 5


@pytest.mark.parametrize("bad", [2.5, True, "5"], ids=repr)
def test_a_rows_sampling_failure_stays_that_rows(served, bad):
    """A setting that slipped past the server's checks (top_k 2.5 makes torch.topk raise a TypeError) ends its
    own row with an error; the greedy neighbour in the same steps still equals generate alone."""
    broken = Request([5, 6, 7], None, SamplingConfig(max_new_tokens=6, temperature=1.0))
    broken.sampling.top_k = bad  # past SamplingConfig's own check, as a value the old server let through
    good = _requests(3, seed=7)
    engine = Engine(served, max_batch=4)
    finished = {}
    for r in [broken, *good]:
        engine.submit(r)
    while engine.busy():
        finished.update({f.request.id: f for f in engine.step()[1]})
    assert finished[broken.id].reason == "error" and "sampling failed" in finished[broken.id].error
    for r in good:
        assert finished[r.id].tokens == alone(served, r)[:len(finished[r.id].tokens)]
        assert finished[r.id].reason in ("stop", "length")


def test_the_registry_writes_a_loaded_adapters_slot_and_evicts_by_emptying_one(tmp_path):
    """Loading through the server's registry writes the new adapter's slot in every layer and leaves the other
    slots' tensors (storage and values) as they were; evicting the least recently used empties its slot, which
    the new adapter takes. The engine then serves the new set exactly."""
    from family_models import load_with_peft_adapters, write_decoder

    from loratune.models import load_model
    from loratune.serve.adapters import AdapterRegistry

    base = write_decoder("llama", tmp_path / "base")
    load_with_peft_adapters(base, tmp_path, MIXED_ADAPTERS)  # writes tmp_path / name for each
    model, _ = load_model(base)
    registry = AdapterRegistry(model, "base", None, max_adapters=2)
    registry.load("b", tmp_path / "b", set(), trusted=True)
    registry.load("a", tmp_path / "a", set(), trusted=True)
    banks = registry.banks
    assert row_banks(model) is banks and banks.slot_of == {"b": 1, "a": 2}
    before = {layer: (bank.A.data_ptr(), bank.B.data_ptr(), bank.A[[0, 2]].clone(), bank.B[[0, 2]].clone())
              for layer, bank in banks.banks.items()}
    assert registry.load("qonly", tmp_path / "qonly", {"a"}, trusted=True) == ["b"]  # b evicted, a is busy
    assert banks.slot_of == {"a": 2, "qonly": 1}
    for layer, (a_ptr, b_ptr, a, b) in before.items():
        bank = banks.banks[layer]
        assert (bank.A.data_ptr(), bank.B.data_ptr()) == (a_ptr, b_ptr)
        assert torch.equal(bank.A[[0, 2]], a) and torch.equal(bank.B[[0, 2]], b)
    engine = Engine(model.eval(), max_batch=3)
    requests = [Request(r.prompt, {None: None, "b": "a"}.get(r.adapter, "qonly"), r.sampling)
                for r in _requests(6, seed=9)]
    answers = run(engine, requests)
    for r in requests:
        assert answers[r.id] == alone(model, r), (r.adapter, r.prompt)
