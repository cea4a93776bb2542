"""loratune/generate/decode_step.py: the static one-token step computes what the model's own forward computes,
greedy generation through it gives transformers' tokens, compiled it agrees with eager, and the serving
engine's lone row (which decodes through it) gives what ``generate`` gives.

Tolerances. The static step attends over every slot of the cache with the unwritten ones masked, where the
ordinary path attends over the slots written so far: the same terms, summed by another kernel, so fp32 logits
agree to float32 rounding (within 1e-5 absolute on these random models of logits of order 1-10). Compiled,
inductor fuses and reorders the norms' and the attention's reductions: within 1e-4 (the bound
tests/models/test_compile.py states for compiled blocks).
"""

from __future__ import annotations

import pytest
import torch
from family_models import CASES, checkpoint_maker, save_family

from loratune.generate import SamplingConfig, generate
from loratune.generate.decode_step import DecodeStep, static_step_applies
from loratune.models import load_model
from loratune.generate.engine import Engine, Request

STATIC = [name for name in CASES if name != "phi3-longrope"]  # longrope's angles change with the length
PROMPT = torch.tensor([[5, 17, 250, 3, 99, 41, 7, 180, 66]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory)


@pytest.fixture(scope="module")
def large_weights(tmp_path_factory):
    """case name -> (our model, transformers' model) of the cases' large random weights (greedy text varies)."""
    made = {}

    def get(name: str):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            hf = save_family(name, path)
            made[name] = (load_model(path)[0].eval(), hf)
        return made[name]
    return get


def _decode_logits(model, ids: torch.Tensor, n: int, static: bool) -> torch.Tensor:
    """Prefill ``ids`` then decode ``n`` greedy tokens one by one; every step's logits (n, B, V)."""
    B, T = ids.shape
    cache = model.new_cache(B, T + n + 1, rings=not static)
    step = DecodeStep(model, T + n + 1) if static else None
    logits, out = model.logits(model.hidden_states(ids, cache)[:, -1]), []
    for _ in range(n):
        out.append(logits)
        token = logits.argmax(-1)[:, None]
        logits = step(token, cache) if static else model.logits(model.hidden_states(token, cache)[:, -1])
    return torch.stack(out)


@pytest.mark.parametrize("name", STATIC)
@torch.inference_mode()
def test_static_step_logits_equal_the_cached_forward(checkpoint, name):
    model = load_model(checkpoint(name))[0].eval()
    ids = torch.cat([PROMPT, PROMPT + 1])  # batch 2: the step serves rows without padding
    eager = _decode_logits(model, ids, 16, static=False)  # 9 + 16 positions: past every case's sliding window
    static = _decode_logits(model, ids, 16, static=True)
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_spans_of_the_cache_past_the_first_64_slots(checkpoint):
    """A cache sized for 200 positions: the step attends to 64, then 128 slots, and still equals the ordinary
    path (the sliding-window case too, its window far behind)."""
    for name in ("llama", "mistral"):
        model = load_model(checkpoint(name))[0].eval()
        caches = model.new_cache(1, 200, rings=False), model.new_cache(1, 200, rings=False)
        step, token = DecodeStep(model, 200), PROMPT[:, -1:]
        for cache in caches:
            model.hidden_states(PROMPT, cache)
        for _ in range(70):  # positions 9 .. 78: across the 64-slot boundary
            a = model.logits(model.hidden_states(token, caches[0])[:, -1])
            b = step(token, caches[1])
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
            token = a.argmax(-1)[:, None]


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "gemma3", "smollm3"])
def test_greedy_tokens_equal_transformers(large_weights, name):
    ours, hf = large_weights(name)
    new = generate(ours, PROMPT, SamplingConfig(max_new_tokens=24))  # the static step by default
    with torch.no_grad():
        ref = hf.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, max_new_tokens=24,
                          min_new_tokens=24, pad_token_id=0)[:, PROMPT.shape[1]:]
    assert new.tolist() == ref.tolist()
    assert len(set(new[0].tolist())) > 3  # the text varies: the comparison can fail


def test_static_and_ordinary_generation_give_the_same_tokens(large_weights):
    ours, _ = large_weights("gemma3")  # sliding-window layers: a ring buffer on the ordinary path
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.8, top_k=50, seed=3)
    assert generate(ours, PROMPT, cfg).tolist() == generate(ours, PROMPT, cfg, static=False).tolist()


def test_which_models_take_the_static_step(checkpoint):
    longrope = load_model(checkpoint("phi3-longrope"))[0]
    llama = load_model(checkpoint("llama"))[0]
    assert not static_step_applies(longrope)
    assert static_step_applies(llama)
    assert not static_step_applies(llama, torch.tensor([[0, 1, 1]]))  # left padding: the ordinary path
    assert static_step_applies(llama, torch.tensor([[1, 1, 1]]))


def test_a_layer_with_forward_hooks_decodes_through_its_forward(checkpoint):
    """FSDP2 gathers a sharded layer's weights in hooks around its forward, which the step would go past
    (tests/dist/test_torchrun.py trains and samples under FSDP2 for real): such a model keeps the ordinary path,
    and its tokens are still generate's."""
    llama = load_model(checkpoint("llama"))[0].eval()
    calls = []
    handle = llama.model.layers[1].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        assert not static_step_applies(llama)
        hooked = generate(llama, PROMPT, SamplingConfig(max_new_tokens=6))
        assert len(calls) >= 6  # the hook saw every step: no step went past it
    finally:
        handle.remove()
    assert static_step_applies(llama)
    assert torch.equal(hooked, generate(llama, PROMPT, SamplingConfig(max_new_tokens=6)))


def test_a_ring_buffer_cache_is_refused(checkpoint):
    model = load_model(checkpoint("mistral"))[0].eval()  # sliding window 12 < 40: ring-buffer layers
    with pytest.raises(ValueError, match="rings=False"):
        DecodeStep(model, 40)(PROMPT[:, :1], model.new_cache(1, 40))


def test_the_cache_end_is_refused(checkpoint):
    model = load_model(checkpoint("llama"))[0].eval()
    cache = model.new_cache(1, PROMPT.shape[1], rings=False)
    with torch.inference_mode():
        model.hidden_states(PROMPT, cache)
        with pytest.raises(ValueError, match="does not fit"):
            DecodeStep(model, PROMPT.shape[1])(PROMPT[:, :1], cache)


def test_the_engine_decodes_a_lone_row_through_the_step_as_generate_does(large_weights):
    model, _ = large_weights("qwen3")
    engine = Engine(model, max_batch=2, max_len=64)
    assert engine.static is not None
    answers = {}
    for prompt in ([5, 17, 250, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]):  # one at a time: the step decodes
        request = Request(prompt, sampling=SamplingConfig(max_new_tokens=15))
        engine.submit(request)
        while engine.busy():
            answers.update({f.request.id: f.tokens for f in engine.step()[1]})
        expected = generate(model, torch.tensor([prompt]), request.sampling, static=False)[0].tolist()
        assert answers[request.id] == expected


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_step_agrees_with_eager(large_weights, dtype):
    """Compiled once (a graph per layer structure), the step gives eager's logits within 1e-4 in fp32 and the
    same greedy tokens in both precisions; no recompile as the position moves within a span."""
    from torch._dynamo.utils import counters

    model, _ = large_weights("qwen3")
    model = model.to(dtype)
    try:
        ids = PROMPT
        cache_e, cache_c = (model.new_cache(1, 40, rings=False) for _ in range(2))
        eager, compiled = DecodeStep(model, 40), DecodeStep(model, 40, compile=True)
        with torch.inference_mode():
            for cache in (cache_e, cache_c):
                model.hidden_states(ids, cache)
            token = ids[:, -1:]
            counters.clear()
            for i in range(12):
                a, b = eager(token, cache_e), compiled(token, cache_c)
                if dtype == torch.float32:
                    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
                assert torch.equal(a.argmax(-1), b.argmax(-1))
                token = a.argmax(-1)[:, None]
            frames = counters["stats"]["unique_graphs"]
        assert compiled.compile_s is not None
        assert frames <= 2  # the layer's graph for every layer and position, and the head's (0 if compiled before)
        cfg = SamplingConfig(max_new_tokens=16)
        assert generate(model, ids, cfg, compile=True).tolist() == generate(model, ids, cfg).tolist()
    finally:
        model.float()
