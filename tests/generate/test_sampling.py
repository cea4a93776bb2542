"""loratune/generate/sampling.py: greedy decoding equals transformers' token for token; sampling is seeded."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT_IDS, randomize_lora_

from loratune.adapters.lora import LoRAConfig, merge_lora
from loratune.adapters.targets import inject_lora
from loratune.errors import ConfigError
from loratune.generate import SamplingConfig, generate, next_token

N = 24
GREEDY = SamplingConfig(max_new_tokens=N)


def _hf_greedy(hf_model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    hf_model.generation_config.eos_token_id = None  # run all N steps, as ours does with eos_ids=None
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
                            do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_greedy_equals_transformers(model, hf_model, use_cache):
    ids = torch.tensor([PROMPT_IDS])
    ours = generate(model, ids, GREEDY, eos_ids=None, use_cache=use_cache)
    ref = _hf_greedy(hf_model, ids)
    assert ours.shape == (1, N)
    assert ours.tolist() == ref.tolist()
    assert len(set(ours[0].tolist())) >= N // 2, "the tiny model's greedy output should not be degenerate"


def test_greedy_left_padded_batch_equals_transformers(model, hf_model):
    rows = [PROMPT_IDS, PROMPT_IDS[2:5], [318, 257, 1332, 286]]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    ours = generate(model, ids, GREEDY, eos_ids=None, attention_mask=mask)
    assert ours.tolist() == _hf_greedy(hf_model, ids, mask).tolist()
    for i, r in enumerate(rows):  # padding changes nothing
        alone = generate(model, torch.tensor([r]), GREEDY, eos_ids=None)
        assert ours[i].tolist() == alone[0].tolist()


def test_merged_and_unmerged_adapter_generate_the_same(model):
    ids = torch.tensor([PROMPT_IDS])
    base = generate(model, ids, GREEDY)
    inject_lora(model, LoRAConfig(r=4, alpha=16, targets=["q", "v", "mlp.fc"]))
    randomize_lora_(model, seed=9, std=0.5)
    unmerged = generate(model, ids, GREEDY)
    assert unmerged.tolist() != base.tolist(), "the adapter should change the text"
    merge_lora(model)
    assert generate(model, ids, GREEDY).tolist() == unmerged.tolist()


def test_eos_stops_generation_and_pads_finished_rows(model):
    ids = torch.tensor([PROMPT_IDS[:4], [318, 257, 1332, 286]])
    free = generate(model, ids, GREEDY, eos_ids=None)
    rows = [r.tolist() for r in free]
    stop = rows[0][5]  # call row 0's 6th token end-of-text
    first = rows[0].index(stop)
    assert stop not in rows[1], "row 1 must run on for this test"
    out = generate(model, ids, GREEDY, eos_ids=[stop])
    assert out.shape == (2, N)  # row 1 never stops, so all N steps run
    assert out[0, :first + 1].tolist() == rows[0][:first + 1]
    assert (out[0, first:] == stop).all(), "a finished row is padded with eos"
    assert out[1].tolist() == rows[1]
    alone = generate(model, ids[:1], GREEDY, eos_ids=[stop])
    assert alone[0].tolist() == rows[0][:first + 1], "a batch whose rows all finished stops early"
    assert generate(model, ids, GREEDY, eos_ids=[]).tolist() == free.tolist(), "no stop ids: no stop"


def test_either_of_two_eos_ids_stops_a_row(model):
    """Llama 3 instruct ends on <|eot_id|> or <|end_of_text|>: each row stops at the first of either,
    and finished rows are padded with the first eos id."""
    ids = torch.tensor([PROMPT_IDS[:4], [318, 257, 1332, 286]])
    rows = [r.tolist() for r in generate(model, ids, GREEDY, eos_ids=None)]
    a = rows[0][5]  # row 0 stops on a, row 1 on b, each at its own step
    b = next(t for t in rows[1][2:] if t not in rows[0])
    first = [rows[0].index(a), rows[1].index(b)]
    assert a not in rows[1][:first[1] + 1] and first[0] != first[1]
    out = generate(model, ids, GREEDY, eos_ids=[b, a])
    assert out.shape == (2, max(first) + 1), "the batch stops once both rows have finished"
    for i, n in enumerate(first):
        assert out[i, :n + 1].tolist() == rows[i][:n + 1]
        assert (out[i, n + 1:] == b).all(), "finished rows are padded with eos_ids[0]"
    with_one = generate(model, ids, GREEDY, eos_ids=[a])  # b alone no longer stops row 1
    assert with_one.shape == (2, N) and with_one[1].tolist() == rows[1]


def test_generation_is_capped_by_the_context(model):
    limit = model.config.n_positions
    ids = torch.randint(0, 1000, (1, limit - 3), generator=torch.Generator().manual_seed(0))
    assert generate(model, ids, SamplingConfig(max_new_tokens=50), eos_ids=None).shape == (1, 3)
    assert generate(model, ids, SamplingConfig(max_new_tokens=0), eos_ids=None).shape == (1, 0)
    with pytest.raises(ConfigError, match="no room"):
        generate(model, torch.zeros(1, limit, dtype=torch.long), SamplingConfig(max_new_tokens=5))


# --- sampling --------------------------------------------------------------------------------

def _sample(model, **kwargs) -> list[int]:
    cfg = SamplingConfig(max_new_tokens=N, temperature=kwargs.pop("temperature", 1.0), **kwargs)
    return generate(model, torch.tensor([PROMPT_IDS]), cfg, eos_ids=None)[0].tolist()


def test_sampling_is_reproducible_per_seed(model):
    a, b, c = _sample(model, seed=1), _sample(model, seed=1), _sample(model, seed=2)
    assert a == b
    assert a != c
    greedy = generate(model, torch.tensor([PROMPT_IDS]), GREEDY, eos_ids=None)[0].tolist()
    assert a != greedy


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    greedy = generate(model, torch.tensor([PROMPT_IDS]), GREEDY, eos_ids=None)[0].tolist()
    assert _sample(model, top_k=1, seed=3) == greedy
    assert _sample(model, top_p=1e-6, seed=3) == greedy
    assert _sample(model, top_k=1, temperature=5.0, seed=4) == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)  # (B, V): many draws at once
    drawn = lambda **kw: set(next_token(logits, SamplingConfig(temperature=1.0, **kw), gen).tolist())  # noqa: E731
    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.45) == {0}  # token 0 alone reaches 0.45
    assert drawn(top_p=0.7) == {0, 1}  # the token that crosses p is kept
    assert drawn(top_p=0.9) == {0, 1, 2}
    assert drawn(top_p=1.0) == {0, 1, 2, 3}
    assert drawn(top_k=3, top_p=0.7) == {0, 1}


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 1.0, 1.5]])
    assert next_token(logits, SamplingConfig(), None).tolist() == [1, 0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
], ids=repr)
def test_sampling_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(**kwargs)



def test_a_vanishing_top_p_or_temperature_keeps_the_most_likely_token():
    """top_p 1e-300 is 0.0 in float32, which used to drop every token (NaN probabilities); a temperature of
    1e-300 overflows the logits to infinities. Both now pick the most likely token, as transformers/vLLM do."""
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    gen = torch.Generator().manual_seed(0)
    assert next_token(logits, SamplingConfig(temperature=1.0, top_p=1e-300), gen).tolist() == [1]
    assert next_token(logits, SamplingConfig(temperature=1e-300), gen).tolist() == [1]
    assert next_token(logits.repeat(500, 1), SamplingConfig(temperature=1e-4), gen).unique().tolist() == [1]


def test_logit_bias_and_penalties_follow_openais_definition():
    from loratune.generate.sampling import LogitsProcessing, token_logprobs

    logits = torch.zeros(1, 6)
    out = LogitsProcessing({2: 100.0, 4: -5.0}, presence_penalty=0.5, frequency_penalty=0.25).apply(logits, [1, 1, 3])
    assert out.tolist() == [[0.0, -1.0, 100.0, -0.75, -5.0, 0.0]]  # 1: 0.5 + 2 * 0.25; 3: 0.5 + 0.25
    assert logits.tolist() == [[0.0] * 6], "the model's logits are left as they were"
    assert not LogitsProcessing().active() and LogitsProcessing(frequency_penalty=0.1).active()
    lp, top = token_logprobs(out, 2, 2)
    assert lp > -1e-6 and [t for t, _ in top] == [2, 0] and top[0][1] == lp
    assert token_logprobs(torch.tensor([[0.0, float("-inf")]]), 1, 0) == (-9999.0, [])  # JSON has no -inf


@pytest.mark.parametrize("kwargs, message", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(logit_bias={3: 101.0}), "logit_bias"),
    (dict(logit_bias={3: float("inf")}), "logit_bias"),
], ids=repr)
def test_logits_processing_validation(kwargs, message):
    from loratune.generate.sampling import LogitsProcessing

    with pytest.raises(ConfigError, match=message):
        LogitsProcessing(**kwargs)
