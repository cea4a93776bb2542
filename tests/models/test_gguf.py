"""GGUF checkpoints read as our families: every architecture and tensor type, against transformers' own
GGUF loader (``from_pretrained(dir, gguf_file=...)``) and against the transformers model the file was
written from; q/k permutation and Gemma's norm shift undone; bad files refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from family_models import hf_family_model
from gguf_files import random_k_blocks, write_model_gguf
from loratune.errors import CheckpointError
from loratune.hub.gguf_file import READABLE_TYPES, read_gguf
from loratune.hub.gguf_write import write_gguf
from loratune.models.gguf import gguf_state_dict, permute, unpermute
from loratune.models.gguf_dir import gguf_config

pytest.importorskip("gguf")

CASES = {  # family case -> overrides a GGUF can carry (llama.cpp stores no per-layer pattern, no Mistral window)
    "llama": {},
    "llama-yarn-bias": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False, "sliding_window": None},
    "qwen3": {},
    "phi3": {},
    "phi3-longrope": {},
    "gemma3": {"num_hidden_layers": 6, "layer_types": None, "query_pre_attn_scalar": 32,
               "final_logit_softcapping": None},
}


def _ours(path: Path):
    file = read_gguf(path)
    family, hf = gguf_config(file)
    config = family.config_from_hf(hf)
    model = family.from_hf_state_dict(config, gguf_state_dict(file, family, config, hf, torch.float32), None)
    return model.eval(), family, hf


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.tensor([[1, 17, 250, 3, 99, 140, 7, 300, 12, 44, 61, 5, 230, 18]])


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_f32_gguf_of_each_family_gives_the_transformers_model_back(case, tmp_path):
    """F32 is lossless: written as the converter writes it and read back, every weight is the original's
    (so q/k permutation and the norm shift are undone exactly) and the logits equal transformers' own."""
    hf_model = hf_family_model(case.split("-")[0] if case == "gemma3" else case, **CASES[case])
    path = write_model_gguf(hf_model, tmp_path / "m.gguf")
    ours, family, hf = _ours(path)
    expected = {k: v for k, v in hf_model.state_dict().items() if "rotary" not in k}
    got = ours.state_dict()
    for key, value in expected.items():
        if family.gguf.norm_shift and key.endswith("norm.weight"):  # stored as 1 + w: one float32 rounding
            torch.testing.assert_close(got[key], value, rtol=0, atol=1.2e-7, msg=key)
        else:
            assert torch.equal(got[key], value), key
    torch.testing.assert_close(_logits(ours, IDS), _logits(hf_model, IDS), rtol=1e-5, atol=1e-4)


TRANSFORMERS_READS = {"llama": {"rope_scaling": None}, "qwen2": CASES["qwen2"], "qwen3": {"head_dim": 128, "rope_scaling": None},
                      "phi3": CASES["phi3"],
                      "gemma3": dict(CASES["gemma3"], rope_scaling=None, head_dim=256, query_pre_attn_scalar=256)}
"""What transformers' GGUF loader reads in full: it drops Llama's biases and rope scalings, and takes Gemma 3's
query_pre_attn_scalar from its config class (256) where llama.cpp uses head_dim, and Qwen3's head_dim too (128,
not attention.key_length); llama.cpp's readings are ours."""


@pytest.mark.parametrize("case", sorted(TRANSFORMERS_READS))
def test_transformers_gguf_loader_reads_the_same_model(case, tmp_path):
    """The conventions (names, permutation, norm shift, config keys) agree with transformers' GGUF
    loader, which shares none of our code: same logits from the same file."""
    from transformers import AutoModelForCausalLM

    hf_model = hf_family_model(case, **TRANSFORMERS_READS[case])
    path = write_model_gguf(hf_model, tmp_path / "m.gguf")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ours, _, _ = _ours(path)
    torch.testing.assert_close(_logits(ours, IDS), _logits(ref, IDS), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", [t for t in READABLE_TYPES if t != "F32"])
def test_each_tensor_type_reads_as_transformers_reads_it(qtype, tmp_path):
    """Every readable type, on every 2-D weight of a tiny Llama (rows of 256 for the K-quants, whose
    blocks are random with sane scales: gguf-py cannot quantize them): logits equal transformers'."""
    from transformers import AutoModelForCausalLM

    hf_model = hf_family_model("llama", rope_scaling=None, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    path = write_model_gguf(hf_model, tmp_path / "m.gguf", qtype=qtype)
    file = read_gguf(path)
    assert file.tensors["blk.0.attn_q.weight"].qtype == qtype
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ours, _, _ = _ours(path)
    ids = IDS.clamp(max=255)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), rtol=1e-5, atol=1e-4)


def test_the_permutation_is_llama_cpps_and_undone_on_rows_of_blocks():
    """permute is the converter's (halves -> adjacent pairs per head); unpermute inverts it, also on the
    rows of quantized blocks (each row is a whole run of blocks)."""
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of 4 rows
    p = permute(w, 2)
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # rows 0,2,1,3 of each head: halves interleaved
    assert torch.equal(unpermute(p, 2), w)
    blocks = random_k_blocks((8, 256), "Q4_K")
    assert torch.equal(unpermute(permute(blocks.data, 2), 2), blocks.data)


# --- bad files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    hf_model = hf_family_model("qwen3")
    return write_model_gguf(hf_model, tmp_path_factory.mktemp("gguf") / "m.gguf")


def test_a_truncated_file_is_refused_by_name(good, tmp_path):
    for keep in (good.stat().st_size // 2, 40, good.stat().st_size - 1):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(good.read_bytes()[:keep])
        with pytest.raises(CheckpointError, match="truncated|corrupt") as err:
            read_gguf(cut)
        assert str(cut) in str(err.value) and "\n" not in str(err.value)


def test_a_file_that_is_not_gguf_and_a_missing_file_are_refused(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_a_corrupt_header_is_refused(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[8:16] = (2**62).to_bytes(8, "little")  # tensor count: absurd
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        read_gguf(bad)


def test_an_unknown_architecture_and_an_unreadable_tensor_type_are_refused_by_name(tmp_path):
    import gguf

    w = torch.randn(4, 32)
    write_gguf(tmp_path / "bert.gguf", "bert", {}, {"token_embd.weight": (w, "F32")})
    with pytest.raises(CheckpointError, match="'bert', which loratune does not read; supported: gemma3, llama"):
        gguf_config(read_gguf(tmp_path / "bert.gguf"))
    raw = torch.randint(0, 255, (4, 18), dtype=torch.uint8)  # IQ4_NL: 32 values in 18 bytes
    from loratune.hub.gguf_file import GGUFBlocks

    write_gguf(tmp_path / "iq.gguf", "llama", {}, {"w": (GGUFBlocks(raw, "IQ4_NL", (4, 32)), "IQ4_NL")})
    with pytest.raises(CheckpointError, match="type IQ4_NL, which loratune does not read; readable: F32"):
        read_gguf(tmp_path / "iq.gguf")
    assert gguf.GGMLQuantizationType.IQ4_NL  # the type exists: the refusal is ours, not a parse failure


def test_an_adapter_gguf_as_a_model_and_a_missing_tensor_are_refused(good, tmp_path):
    file = read_gguf(good)
    meta = dict(file.metadata, **{"general.type": "adapter", "adapter.type": "lora"})
    write_gguf(tmp_path / "a.gguf", file.architecture, meta, {"blk.0.attn_q.weight.lora_a": (torch.ones(2, 64), "F32")})
    with pytest.raises(CheckpointError, match="LoRA adapter GGUF, not a model"):
        gguf_config(read_gguf(tmp_path / "a.gguf"))
    tensors = {n: (t.dequantize(), "F32") for n, t in file.tensors.items() if n != "blk.1.ffn_up.weight"}
    write_gguf(tmp_path / "short.gguf", file.architecture, file.metadata, tensors)
    short = read_gguf(tmp_path / "short.gguf")
    family, hf = gguf_config(short)
    with pytest.raises(CheckpointError, match="lacks tensor blk.1.ffn_up.weight"):
        gguf_state_dict(short, family, family.config_from_hf(hf), hf, None)


def test_reading_writes_nothing_beside_the_input(good, tmp_path):
    """Reading a GGUF (and building its model directory) leaves the input's folder as it was."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "m.gguf")
    before = sorted(p.name for p in folder.iterdir())
    _ours(folder / "m.gguf")
    assert sorted(p.name for p in folder.iterdir()) == before
