"""Fuzz targets: every parser of outside input, fed malformed input by hypothesis.

Shared by tests/test_fuzz.py (a bounded run inside the test suite) and benchmarks/fuzz.py (the
long run). The property is the same everywhere: a parser either accepts its input (and what it
built then works: a loaded model runs a forward pass) or raises one of our own errors
(:class:`loratune.errors.LoratuneError`); any other exception is a crash, and an input that
takes longer than the per-example deadline is a hang.

Targets, by what they read:

==================  ============================================================================
safetensors         ``read_safetensors`` on random, mutated and hand-built files (bad header
                    length, bad JSON, wrong dtypes, shapes and offsets, short data)
model.weights       ``load_model`` on a directory whose model.safetensors is such a file
model.index         ``read_state_dict`` on a sharded index with random weight maps (escaping paths)
model.config        ``load_model`` with config.json values of random types, then a forward pass
adapter.weights     ``load_adapter`` with a corrupted adapter_model.safetensors
adapter.config      ``load_adapter`` with random adapter_config.json / loratune_adapter.json values
recipe              ``load_recipe`` on random YAML text, random recipe mappings, and ``--set`` values
data                ``load_records`` + ``build_examples`` on random .jsonl/.json/.csv/.txt files
==================  ============================================================================
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from hypothesis import strategies as st

from loratune.adapters.peft_format import save_adapter
from loratune.hub.files import read_safetensors, read_state_dict
from loratune.models.gpt2 import GPT2_SPEC
from loratune.data import DataConfig, build_examples, load_records
from loratune.errors import LoratuneError
from loratune.hub.export import save_hf_model
from loratune.adapters.lora import LoRAConfig, lora_layers
from loratune.models import GPT2, GPT2Config, load_model
from loratune.adapters.peft_format import load_adapter
from loratune.recipe import load_recipe
from loratune.adapters.targets import inject_lora
from loratune.data.tokenizer import load_tokenizer

DEADLINE_S = 10.0
"""Per-example limit; generous for a busy 2-core machine, where the slowest example takes < 0.5 s."""

SMALL = dict(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=2)


class Hang(Exception):
    """An input kept a parser busy past the deadline."""


@contextmanager
def deadline(seconds: float = DEADLINE_S):
    """Raise :class:`Hang` in the main thread once ``seconds`` have passed (SIGALRM)."""
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(run: Callable[[], Any]) -> str:
    """'accepted', or the name of the LoratuneError raised; anything else propagates (a crash)."""
    try:
        with deadline():
            run()
    except LoratuneError as exc:
        return type(exc).__name__
    return "accepted"


# --- the valid inputs the mutations start from --------------------------------------------------

@dataclass
class Fixtures:
    """A small GPT-2 checkpoint, a PEFT adapter for it, the GPT-2 tokenizer and a scratch directory."""

    root: Path
    model_dir: Path = field(init=False)
    adapter_dir: Path = field(init=False)
    weights: bytes = field(init=False)
    adapter_weights: bytes = field(init=False)
    config: dict = field(init=False)
    adapter_config: dict = field(init=False)
    adapter_extra: dict = field(init=False)
    tokenizer: Any = field(init=False)

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        model = GPT2(GPT2Config(**SMALL)).init_weights(0)
        self.model_dir = save_hf_model(model, self.root / "model")
        self.weights = (self.model_dir / "model.safetensors").read_bytes()
        self.config = json.loads((self.model_dir / "config.json").read_text())
        lora = LoRAConfig(r=2, alpha=4, targets=["q", "v", "mlp.fc"])
        inject_lora(model, lora)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for b in layer.lora_B.values():
                    b.normal_()
        self.adapter_dir = save_adapter(model, self.root / "adapter", lora, base_model=str(self.model_dir))
        self.adapter_weights = (self.adapter_dir / "adapter_model.safetensors").read_bytes()
        self.adapter_config = json.loads((self.adapter_dir / "adapter_config.json").read_text())
        self.adapter_extra = json.loads((self.adapter_dir / "loratune_adapter.json").read_text())
        tok_dir = self.root / "tokenizer"
        tok_dir.mkdir()
        GPT2_SPEC.offline_tokenizer(tok_dir)
        self.tokenizer = load_tokenizer(tok_dir)
        self.base_model = model  # not used by the targets: they load fresh models

    def scratch(self, name: str, template: Path | None = None) -> Path:
        """A directory for one target, reset to a copy of ``template`` (or empty)."""
        path = self.root / "scratch" / name
        if path.exists():
            shutil.rmtree(path)
        if template is not None:
            shutil.copytree(template, path)
        else:
            path.mkdir(parents=True)
        return path


def _forward(model: torch.nn.Module) -> None:
    """What 'accepted' must mean: the model computes finite-shaped logits."""
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape[:2] == (1, 4)


# --- strategies ---------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
          "U16", "U32", "U64", "C64", "F4", "E8M0", "f32", ""]
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}


def _pack(header: Any, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, (str, bytes)) else json.dumps(header, allow_nan=True)
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    n = len(raw) if length is None else length
    return struct.pack("<Q", n % 2**64) + raw + data


@st.composite
def built_safetensors(draw, names: list[str] | None = None) -> bytes:
    """A header built entry by entry (consistent, then maybe corrupted) and a data buffer."""
    count = draw(st.integers(0, 4))
    keys = names or []
    header, offset = {}, 0
    for i in range(count):
        dtype = draw(st.sampled_from(list(_SIZES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = _SIZES[dtype]
        for d in shape:
            size *= d
        name = draw(st.sampled_from(keys)) if keys and draw(st.booleans()) else draw(st.text(max_size=10))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2))
    data = draw(st.binary(min_size=offset, max_size=offset))
    corruption = draw(st.sampled_from(["none", "dtype", "shape", "offsets", "short", "long", "length",
                                       "entry", "metadata", "padding"]))
    entries = [k for k in header if k != "__metadata__"]
    if corruption == "dtype" and entries:
        header[draw(st.sampled_from(entries))]["dtype"] = draw(st.sampled_from(DTYPES) | json_values)
    elif corruption == "shape" and entries:
        header[draw(st.sampled_from(entries))]["shape"] = draw(
            st.lists(st.integers(-2, 2**62) | st.integers(-1, 6), max_size=4) | json_values)
    elif corruption == "offsets" and entries:
        header[draw(st.sampled_from(entries))]["data_offsets"] = draw(
            st.lists(st.integers(-2, 2**64) | st.integers(0, offset + 2), max_size=3) | json_values)
    elif corruption == "short":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif corruption == "long":
        data += draw(st.binary(min_size=1, max_size=16))
    elif corruption == "entry" and entries:
        header[draw(st.sampled_from(entries))] = draw(json_values)
    elif corruption == "metadata":
        header["__metadata__"] = draw(json_values)
    text = json.dumps(header, allow_nan=True)
    if corruption == "padding":
        text += draw(st.text(alphabet=" \x00\n{}", max_size=8))
    if corruption == "length":
        return _pack(text, data, draw(st.integers(0, 2**64 - 1) | st.integers(0, len(text) + 8)))
    return _pack(text, data)


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with a few byte flips, insertions, deletions and a maybe-truncated tail."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "length"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "length" and len(data) >= 8:
            data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(data))))
    return bytes(data)


def safetensors_files(original: bytes, names: list[str] | None = None) -> st.SearchStrategy[bytes]:
    bad_json = st.builds(lambda t: _pack(t, b""), st.text(max_size=40))
    return st.one_of(st.binary(max_size=256), mutated(original), built_safetensors(names), bad_json)


def config_dicts(valid: dict) -> st.SearchStrategy[Any]:
    """config.json: the valid one with some keys replaced by random values, or any JSON at all."""
    keys = sorted(set(valid) | {"n_inner", "activation_function", "tie_word_embeddings", "architectures",
                                "scale_attn_by_inverse_layer_idx", "layer_norm_epsilon"})
    sizes = st.integers(-2, 200) | st.sampled_from([2**24, 2**24 + 1, 2**31, 2**63, 10**9, 10**30])
    edits = st.dictionaries(st.sampled_from(keys), json_values | sizes, min_size=1, max_size=4)
    drops = st.lists(st.sampled_from(keys), max_size=2)
    return st.one_of(st.builds(lambda e, d: {**{k: v for k, v in valid.items() if k not in d}, **e}, edits, drops),
                     json_values)


ADAPTER_KEYS = ["r", "lora_alpha", "target_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "use_rslora", "lora_dropout", "peft_type", "bias", "modules_to_save",
                "exclude_modules", "fan_in_fan_out", "task_type", "use_dora", "base_model_name_or_path"]
_PATTERNS = st.sampled_from(["q", "c_attn", "transformer.h.0.attn.c_attn", ".*", "(", "[", "*", "h", "0", "",
                             "c_fc", "mlp", "layers", "h\\.(0|1)"])


def adapter_configs(valid: dict, extra: dict) -> st.SearchStrategy[tuple[Any, Any]]:
    """(adapter_config.json, loratune_adapter.json or None) with random values where they matter."""
    value = json_values | _PATTERNS | st.lists(_PATTERNS, max_size=3) | st.integers(-1, 8) \
        | st.dictionaries(_PATTERNS, st.integers(-1, 8) | json_scalars, max_size=2)
    edits = st.dictionaries(st.sampled_from(ADAPTER_KEYS), value, min_size=1, max_size=4)
    config = st.one_of(st.builds(lambda e: {**valid, **e}, edits), json_values)
    slices = st.just({"transformer.h.0.attn.c_attn": {"q": [0, 16], "v": [32, 48]}})
    lora = st.dictionaries(st.sampled_from(["r", "alpha", "targets", "dropout", "rslora", "x"]),
                           json_scalars | st.integers(0, 4), max_size=3)
    extra_edits = st.dictionaries(st.sampled_from(["lora", "slices", "format_version", "base_config"]),
                                  json_values | slices | lora, max_size=2)
    extras = st.none() | st.builds(lambda e: {**extra, **e}, extra_edits) | json_values
    return st.tuples(config, extras)


RECIPE_KEYS = ["model", "out_dir", "finetune", "seq_len", "batch_size", "grad_accum", "max_steps", "epochs", "lr",
               "weight_decay", "adam_eps", "adam_betas", "max_grad_norm", "schedule", "warmup_steps", "precision",
               "seed", "device", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints",
               "sample_prompt", "sample_tokens", "lora", "data", "activation_checkpointing", "activation_offload",
               "quantize", "double_quant", "unknown_key"]
LORA_KEYS = ["r", "alpha", "dropout", "targets", "rslora", "use_dora", "init", "plus_ratio", "x"]
DATA_KEYS = ["source", "hub_config", "split", "task", "text_field", "prompt_template", "completion_template",
             "packing", "max_examples", "val_source", "val_fraction", "shuffle"]
_YAML_SNIPPETS = ["!!python/object/apply:os.system ['true']", "2001-13-45", "2001-02-03", "!!timestamp 2001-99-99",
                  "&a [*a]", "*undefined", "!!binary 'zz'", "{a: 1", "- [", "<<: *x", "!!int 'x'", "!!float 'x'",
                  "1e309", "-.inf", ".nan", "0x1F", "0o17", "1_000", "~", "'", "? complex\n: key", "\t",
                  "%YAML 9.9\n---"]


def _yaml_value(draw_value: Any) -> str:
    try:
        return yaml.safe_dump(draw_value, default_flow_style=True).strip()
    except yaml.YAMLError:
        return "x"


@st.composite
def recipe_texts(draw) -> tuple[str, list[str]]:
    """(recipe YAML text, --set overrides)."""
    kind = draw(st.sampled_from(["text", "mapping", "snippet"]))
    section = st.dictionaries(st.sampled_from(LORA_KEYS + DATA_KEYS), json_values | st.integers(-2, 64), max_size=3)
    if kind == "text":
        text = draw(st.text(max_size=120))
    elif kind == "mapping":
        values = draw(st.dictionaries(st.sampled_from(RECIPE_KEYS),
                                      json_values | st.integers(-2, 64) | st.floats(-1, 1) | section, max_size=5))
        text = yaml.safe_dump(values, allow_unicode=True)
    else:
        key = draw(st.sampled_from(RECIPE_KEYS))
        text = f"{key}: {draw(st.sampled_from(_YAML_SNIPPETS))}\n"
    dotted = st.sampled_from(RECIPE_KEYS + [f"lora.{k}" for k in LORA_KEYS] + [f"data.{k}" for k in DATA_KEYS]
                             + ["seq_len.x", "lora", "", "=", "a..b"])
    overrides = draw(st.lists(st.builds(lambda k, v: f"{k}={v}", dotted,
                                        st.sampled_from(_YAML_SNIPPETS) | st.text(max_size=12)
                                        | json_values.map(_yaml_value)), max_size=2))
    return text, overrides


TEMPLATES = ["{documents}\nTL;DR: ", "{tldr}", "{text}", "{text.x}", "{text[0]}", "{text:d}", "{text!r}",
             "{documents:>{tldr}}", "{0}", "{}", "{", "}", "plain", "{text}{missing}", "{text:%}"]


@st.composite
def data_files(draw) -> tuple[str, bytes, dict]:
    """(file suffix, file bytes, DataConfig keyword arguments)."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
    fields = st.sampled_from(["text", "documents", "tldr", "", "x"]) | st.text(max_size=6)
    record = st.dictionaries(fields, json_values | st.text(max_size=40), max_size=4)
    kind = draw(st.sampled_from(["bytes", "structured", "structured", "plausible", "digits"]))
    if kind == "plausible":  # mostly well-formed records, so that the inputs also reach tokenizing and packing
        record = st.dictionaries(st.sampled_from(["text", "documents", "tldr"]), st.text(max_size=40)
                                 | json_scalars, min_size=2, max_size=3)
    if kind == "bytes":
        data = draw(st.binary(max_size=300))
    elif kind == "digits":  # numbers past Python's int-from-string limit (4300 digits)
        data = ('{"text": ' + "9" * draw(st.integers(4000, 5000)) + "}\n").encode()
    elif suffix == ".jsonl":
        lines = draw(st.lists(record | json_values, max_size=6))
        data = "".join(json.dumps(r, allow_nan=True) + "\n" for r in lines).encode("utf-8", "surrogatepass")
    elif suffix == ".json":
        value = draw(st.lists(record, max_size=6) | st.fixed_dictionaries({"data": st.lists(record | json_values,
                                                                                            max_size=4)}) | json_values)
        data = json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")
    elif suffix == ".csv" and kind == "plausible":
        rows = draw(st.lists(st.lists(st.text(alphabet="abc ,\"\n", max_size=12), min_size=3, max_size=3),
                             max_size=5))
        data = ("text,documents,tldr\n" + "".join(",".join(row) + "\n" for row in rows)).encode()
    elif suffix == ".csv":
        rows = draw(st.lists(st.lists(st.text(max_size=20), max_size=4), max_size=6))
        data = "\n".join(",".join(row) for row in rows).encode("utf-8", "surrogatepass")
    else:
        data = draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    templates = st.sampled_from(TEMPLATES[:3]) | st.sampled_from(TEMPLATES)
    config = {
        "source": "unused", "task": draw(st.sampled_from(["causal_lm", "completion"])),
        "text_field": draw(st.sampled_from(["text", "documents"])),
        "prompt_template": draw(templates), "completion_template": draw(templates),
        "val_fraction": 0.0,
    }
    config["packing"] = config["task"] == "causal_lm" and draw(st.booleans())
    return suffix, data, config


# --- the targets --------------------------------------------------------------------------------

def run_safetensors(fx: Fixtures, data: bytes) -> str:
    path = fx.root / "scratch" / "t.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return outcome(lambda: read_safetensors(path))


def run_model_weights(fx: Fixtures, data: bytes) -> str:
    d = fx.scratch("model-weights", fx.model_dir)
    (d / "model.safetensors").write_bytes(data)

    def load() -> None:
        model, _ = load_model(d)
        _forward(model)
    return outcome(load)


def run_model_index(fx: Fixtures, index: Any) -> str:
    d = fx.scratch("model-index", fx.model_dir)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index, allow_nan=True), encoding="utf-8")
    return outcome(lambda: read_state_dict(d))


def run_model_config(fx: Fixtures, config: Any) -> str:
    d = fx.scratch("model-config", fx.model_dir)
    (d / "config.json").write_text(json.dumps(config, allow_nan=True), encoding="utf-8")

    def load() -> None:
        model, _ = load_model(d)
        _forward(model)
    return outcome(load)


def _fresh_model() -> GPT2:
    return GPT2(GPT2Config(**SMALL)).init_weights(0)


def run_adapter_weights(fx: Fixtures, data: bytes) -> str:
    d = fx.scratch("adapter-weights", fx.adapter_dir)
    (d / "adapter_model.safetensors").write_bytes(data)

    def load() -> None:
        model = _fresh_model()
        load_adapter(model, d)
        _forward(model)
    return outcome(load)


def run_adapter_config(fx: Fixtures, value: tuple[Any, Any]) -> str:
    config, extra = value
    d = fx.scratch("adapter-config", fx.adapter_dir)
    (d / "adapter_config.json").write_text(json.dumps(config, allow_nan=True), encoding="utf-8")
    if extra is None:
        (d / "loratune_adapter.json").unlink()
    else:
        (d / "loratune_adapter.json").write_text(json.dumps(extra, allow_nan=True), encoding="utf-8")

    def load() -> None:
        model = _fresh_model()
        load_adapter(model, d)
        _forward(model)
    return outcome(load)


def run_recipe(fx: Fixtures, value: tuple[str, list[str]]) -> str:
    text, overrides = value
    path = fx.root / "scratch" / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return outcome(lambda: load_recipe(path, overrides))


def run_data(fx: Fixtures, value: tuple[str, bytes, dict]) -> str:
    suffix, data, kwargs = value
    path = fx.root / "scratch" / f"data{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

    def load() -> None:
        cfg = DataConfig(**{**kwargs, "source": str(path)})
        records = load_records(str(path), cfg)
        build_examples(records, cfg, fx.tokenizer, seq_len=16)
    return outcome(load)


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable[[Fixtures], st.SearchStrategy]
    run: Callable[[Fixtures, Any], str]


def _index_maps(fx: Fixtures) -> st.SearchStrategy:
    names = list(read_safetensors(fx.model_dir / "model.safetensors"))
    shard = st.sampled_from(["model-00001-of-00001.safetensors", "../model/model.safetensors", "/etc/passwd",
                             "../../x.safetensors", ".", "", "model-00001-of-00001.safetensors/..",
                             "nonexistent.safetensors"]) | json_values
    weight_map = st.dictionaries(st.sampled_from(names) | st.text(max_size=6), shard, max_size=4)
    return st.one_of(st.fixed_dictionaries({"weight_map": weight_map}), json_values,
                     st.fixed_dictionaries({"metadata": json_values, "weight_map": json_values}))


def _adapter_names(fx: Fixtures) -> list[str]:
    return list(read_safetensors(fx.adapter_dir / "adapter_model.safetensors"))


TARGETS = [
    Target("safetensors", lambda fx: safetensors_files(fx.weights), run_safetensors),
    Target("model.weights", lambda fx: safetensors_files(fx.weights, list(read_safetensors(
        fx.model_dir / "model.safetensors"))), run_model_weights),
    Target("model.index", _index_maps, run_model_index),
    Target("model.config", lambda fx: config_dicts(fx.config), run_model_config),
    Target("adapter.weights", lambda fx: safetensors_files(fx.adapter_weights, _adapter_names(fx)),
           run_adapter_weights),
    Target("adapter.config", lambda fx: adapter_configs(fx.adapter_config, fx.adapter_extra), run_adapter_config),
    Target("recipe", lambda fx: recipe_texts(), run_recipe),
    Target("data", lambda fx: data_files(), run_data),
]
