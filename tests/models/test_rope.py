"""Rotary frequencies equal transformers' for every rope type published configs use."""

from __future__ import annotations

import pytest
import torch

from loratune.errors import CheckpointError
from loratune.models.rope import apply_rope, inv_freq, rope_cos_sin, rope_from_hf

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32,
             "beta_slow": 1},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                    "mscale_all_dim": 0.8},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(32)],
                 "long_factor": [1.2 + 0.3 * i for i in range(32)], "original_max_position_embeddings": 4096},
}


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("seq_len", [100, 200000])
def test_inverse_frequencies_equal_transformers_bit_for_bit(name, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = SCALINGS[name]
    config = LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=scaling)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, scale = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected, scale = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    rope = rope_from_hf(scaling, 500000.0, 131072)
    actual, our_scale = inv_freq(rope, 64, 131072, seq_len)
    assert torch.equal(actual, expected.float())
    assert our_scale == pytest.approx(scale, rel=1e-12)


def test_cos_sin_and_rotation_match_transformers_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rope = rope_from_hf(SCALINGS["llama3"], 500000.0, 131072)
    pos = torch.arange(5, 45)[None].expand(2, 40)
    cos, sin = rope_cos_sin(rope, 64, 131072, pos, torch.float32)
    q, k = torch.randn(2, 4, 40, 64), torch.randn(2, 2, 40, 64)
    eq, ek = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), eq) and torch.equal(apply_rope(k, cos, sin), ek)


def test_partial_rotary_leaves_the_rest_unrotated():
    rope = rope_from_hf({"partial_rotary_factor": 0.75}, 10000.0, 4096)
    cos, sin = rope_cos_sin(rope, 32, 4096, torch.arange(7)[None], torch.float32)
    assert cos.shape[-1] == 24
    x = torch.randn(1, 2, 7, 32)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 24:], x[..., 24:]) and not torch.equal(y[..., :24], x[..., :24])


@pytest.mark.parametrize("params, message", [
    ({"rope_type": "su2"}, "rope_type 'su2' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor is required"),
    ({"rope_type": "linear"}, "factor is required"),
    ({"rope_type": "linear", "factor": -2}, "factor must be a positive number"),
    ({"rope_type": "longrope", "short_factor": [], "long_factor": [1.0]}, "short_factor must be a list"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor must be at most 1"),
])
def test_bad_rope_settings_are_named(params, message):
    with pytest.raises(CheckpointError, match=message):
        rope_from_hf(params, 10000.0, 4096)
