"""The Llama-style decoder equals transformers on every family: logits, greedy generation, padding."""

from __future__ import annotations

import pytest
import torch

from family_models import CASES, save_family
from loratune.generate.sampling import SamplingConfig, generate
from loratune.models import load_model


def _hf_greedy(hf, prompt: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """transformers' greedy generate for exactly ``n`` tokens, with no stop token."""
    hf.generation_config.eos_token_id = None  # a passed config is merged with this one, eos included
    return hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)


@pytest.fixture(scope="module")
def family_pairs(tmp_path_factory):
    """name -> (transformers model, our model loaded from its save_pretrained directory)."""
    pairs = {}
    for name in CASES:
        d = tmp_path_factory.mktemp(name)
        hf = save_family(name, d)
        ours, _ = load_model(d)
        pairs[name] = (hf, ours)
    return pairs


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(family_pairs, name):
    hf, ours = family_pairs[name]
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = hf(ids).logits, ours(ids)
    assert expected.abs().max() > 1.0  # not a degenerate model
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_token_identical(family_pairs, name):
    """48 new tokens: past every sliding window, past Phi-3's longrope switch at 32 positions."""
    hf, ours = family_pairs[name]
    prompt = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # no stop token: min_new_tokens would instead forbid the eos id, changing the argmax
        expected = _hf_greedy(hf, prompt, 48)[0, 8:]
    actual = generate(ours, prompt, SamplingConfig(max_new_tokens=48, temperature=0.0))[0]
    assert len(set(expected.tolist())) >= 8  # varied output, not one repeated token
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["mistral", "gemma3", "qwen3"])
def test_left_padded_batch_generation_equals_transformers(family_pairs, name):
    hf, ours = family_pairs[name]
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, 320, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # the first row is 6 tokens, left-padded
    prompts[0, :4] = 0
    with torch.no_grad():
        expected = _hf_greedy(hf, prompts, 30, attention_mask=mask)[:, 10:]
    actual = generate(ours, prompts, SamplingConfig(max_new_tokens=30, temperature=0.0), attention_mask=mask)
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["mistral", "gemma3", "phi3"])
def test_chunked_prefill_through_the_ring_buffer_equals_one_pass(family_pairs, name):
    """A prompt fed in chunks longer than the window (the ring buffer wraps mid-chunk) gives the
    hidden states of one uncached pass."""
    _, ours = family_pairs[name]
    ids = torch.randint(0, 320, (2, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours.hidden_states(ids)
        cache = ours.new_cache(2, 64)
        parts = [ours.hidden_states(ids[:, a:b], cache=cache) for a, b in ((0, 17), (17, 18), (18, 40), (40, 45))]
    assert any(cache.ring)  # the window really is shorter than the cache
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_bf16_logits_close_to_transformers_bf16(family_pairs):
    hf, ours = family_pairs["qwen3"]
    ids = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf.to(torch.bfloat16)(ids).logits.float()
        actual = ours.to(torch.bfloat16)(ids).float()
    hf.float(), ours.float()
    assert (actual - expected).abs().max() / expected.abs().max() < 0.02


def test_sliding_window_layer_sees_only_its_window(family_pairs):
    """Changing a token outside every window of a sliding-only model leaves later logits unchanged
    in the first layer's reach: with one sliding layer stack (Mistral, window 12, 3 layers) a token
    more than 3 x 11 positions back cannot matter."""
    _, ours = family_pairs["mistral"]
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(6))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 320
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert torch.equal(a[0, 34:], b[0, 34:])  # beyond 3 x 11 positions: no path back to position 0
    assert not torch.equal(a[0, 1:12], b[0, 1:12])  # within the window: it matters
