"""Bad inputs through the real CLI, one table: every command refuses cleanly and loses nothing.

Each row runs ``python -m loratune ...`` in a subprocess and asserts:
- the exit code (2 for a refused input; 0 where the input is legitimate and a notice is due);
- no traceback on stderr;
- a message (stderr) that names the problem;
- every file that existed before (the shared world: model, adapters, data, earlier runs) is
  byte-identical afterwards.

New commands (data, serve, distributed) add their rows here. Bounded: each row is one short
process on a tiny model (2 layers, width 64), with a 120 s timeout.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratune.cli import main

WORLD_TRAIN = ["--set", "seq_len=16", "--set", "batch_size=4", "--set", "max_steps=2", "--set", "sample_tokens=0",
               "--set", "data.text_field=text", "--set", "eval_every=0", "--set", "precision=fp32", "--no-progress"]

assert WORLD_TRAIN[9] == "data.text_field=text"  # the row with a number in text_field leaves this one out


def _write_jsonl(path: Path, n: int = 24) -> Path:
    path.write_text("".join(json.dumps({"text": f"the dog number {i} ran to the red house."}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def _poison(src: Path, dst: Path, weights: str) -> Path:
    """A copy of ``src`` whose first tensor in ``weights`` holds a NaN."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(dst / weights), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory, ckpt) -> dict[str, Path]:
    """Everything the rows point at; built once, and never changed by any row."""
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "model": root / "model"}
    shutil.copytree(ckpt, w["model"])
    w["data"] = _write_jsonl(root / "data.jsonl")
    w["empty"] = root / "empty.jsonl"
    w["empty"].write_text("")
    w["headless_csv"] = root / "headless.csv"
    w["headless_csv"].write_text("".join(f'"this is a long post number {i}, written without a header row at the top '
                                         f'of the file, so its first line is taken for field names",tl;dr {i}\n'
                                         for i in range(6)), encoding="utf-8")
    w["run"] = root / "run"
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: {w['model']}\nout_dir: {w['run']}\ndata:\n  source: {w['data']}\n")
    w["recipe"] = recipe
    assert main(["train", str(recipe), *WORLD_TRAIN]) == 0
    w["adapter"] = w["run"] / "adapter"
    w["nan_adapter"] = _poison(w["adapter"], root / "nan-adapter", "adapter_model.safetensors")
    w["nan_model"] = _poison(w["model"], root / "nan-model", "model.safetensors")
    w["corrupt_extra"] = root / "corrupt-extra"
    shutil.copytree(w["adapter"], w["corrupt_extra"])
    (w["corrupt_extra"] / "loratune_adapter.json").write_text("{not json")
    w["half_adapter"] = _half_adapter(w["adapter"], root / "half-adapter")
    w["merged"] = root / "merged"
    assert main(["merge", "--model", str(w["model"]), "--adapter", str(w["adapter"]), "--out", str(w["merged"])]) == 0
    w["both_formats"] = root / "both-formats"
    shutil.copytree(w["model"], w["both_formats"])
    torch.save(load_file(w["model"] / "model.safetensors"), w["both_formats"] / "pytorch_model.bin")
    w["small_vocab"] = root / "small-vocab"
    assert main(["init-model", "--out", str(w["small_vocab"])]) == 0
    config = json.loads((w["small_vocab"] / "config.json").read_text())
    tensors = load_file(w["small_vocab"] / "model.safetensors")
    tensors = {k: (v[:1000].clone() if v.shape[0] == config["vocab_size"] else v) for k, v in tensors.items()}
    save_file(tensors, str(w["small_vocab"] / "model.safetensors"), metadata={"format": "pt"})
    (w["small_vocab"] / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    w["empty_recipe"] = root / "empty-recipe.yaml"
    w["empty_recipe"].write_text("# nothing here\n")
    w["number_field"] = root / "number-field.yaml"
    w["number_field"].write_text(f"model: {w['model']}\ndata:\n  source: {w['data']}\n  text_field: 5\n")
    w["file"] = root / "a-file.txt"
    w["file"].write_text("a file, not a directory")
    _family_world(w, root)
    _chat_world(w, root)
    _settings_world(w, root)
    _writes_world(w, root)
    _data_world(w, root)
    # -- issue 24: world additions (one call per helper function) --
    _gguf_world(w, root)
    return w


def _gguf_world(w: dict[str, Path], root: Path) -> None:
    """GGUF files: a tiny Qwen3 with a small byte-level tokenizer, the same cut short, a file that is not GGUF, a
    GGUF of an architecture loratune does not read, and a LoRA adapter GGUF made for another base (a Llama)."""
    from family_models import hf_family_model
    from gguf_files import tiny_tokenizer_meta, write_model_gguf

    from loratune.hub.gguf_write import write_gguf

    w["gguf"] = write_model_gguf(hf_family_model("qwen3"), root / "qwen3.gguf", tokenizer_meta=tiny_tokenizer_meta(320))
    w["gguf_cut"] = root / "qwen3-cut.gguf"
    w["gguf_cut"].write_bytes(w["gguf"].read_bytes()[: w["gguf"].stat().st_size * 2 // 3])
    w["not_gguf"] = root / "not-a.gguf"
    w["not_gguf"].write_text("this is a text file with the wrong suffix")
    w["bert_gguf"] = write_gguf(root / "bert.gguf", "bert", {"general.type": "model"},
                                {"token_embd.weight": (torch.randn(8, 32), "F32")})
    w["lora_gguf"] = write_gguf(root / "other-lora.gguf", "llama", {
        "general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0},
        {"blk.0.attn_q.weight.lora_a": (torch.randn(4, 32), "F32"), "blk.0.attn_q.weight.lora_b": (torch.randn(32, 4), "F32")})


def _settings_world(w: dict[str, Path], root: Path) -> None:
    """An adapter whose alpha (1e38) makes finite weights give Inf logits, and a recipe that is a YAML alias bomb
    (9**10 values)."""
    w["huge_alpha"] = root / "huge-alpha"
    shutil.copytree(w["adapter"], w["huge_alpha"])
    config = json.loads((w["huge_alpha"] / "adapter_config.json").read_text())
    (w["huge_alpha"] / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e38}))
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    w["alias_bomb"] = root / "bomb.yaml"
    w["alias_bomb"].write_text("\n".join(lines) + "\n")


def _writes_world(w: dict[str, Path], root: Path) -> None:
    """Outputs pointed at inputs: a directory holding a model (a full fine-tune's RUN/model), one holding a
    hand-written recipe, one holding a data file beside a user's own metrics.jsonl (and a symlink to it), and
    one whose loratune manifest is damaged."""
    w["model_run"] = root / "model-run"
    shutil.copytree(w["model"], w["model_run"] / "model")
    w["own_recipe_dir"] = root / "own-recipe"
    w["own_recipe_dir"].mkdir()
    (w["own_recipe_dir"] / "recipe.yaml").write_text(f"# my recipe\nmodel: {w['model']}\ndata:\n  source: {w['data']}\n")
    w["user_dir"] = root / "user-dir"
    w["user_dir"].mkdir()
    shutil.copyfile(w["data"], w["user_dir"] / "train.jsonl")
    (w["user_dir"] / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "note": "my own evaluation"}\n')
    w["user_link"] = root / "user-link"
    w["user_link"].symlink_to(w["user_dir"], target_is_directory=True)
    w["bad_manifest"] = root / "bad-manifest"
    w["bad_manifest"].mkdir()
    (w["bad_manifest"] / ".loratune-manifest.json").write_text('{"outputs": ["../model"]}')
    (w["bad_manifest"] / "samples.json").write_text("{}")


def _half_adapter(src: Path, dst: Path) -> Path:
    """A copy of the world's adapter on layer 0 only: an adapter of other targets than the original."""
    shutil.copytree(src, dst)
    tensors = {k: v for k, v in load_file(dst / "adapter_model.safetensors").items() if ".h.0." in k}
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["transformer.h.0.attn.c_attn"]}))
    extra = json.loads((dst / "loratune_adapter.json").read_text())
    extra["slices"] = {k: v for k, v in extra["slices"].items() if ".h.0." in k}
    (dst / "loratune_adapter.json").write_text(json.dumps(extra))
    return dst


def _data_world(w: dict[str, Path], root: Path) -> None:
    """Hostile chat templates and variables, a prompt template reaching past its fields, a CSV with an
    unterminated quote on line 3, and texts that are NaN or a number on line 3 of their files."""
    w["loop_template"] = root / "loop.jinja"
    w["loop_template"].write_text("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}"
                                  "{% endfor %}")
    w["attr_recipe"] = root / "attr-recipe.yaml"
    w["attr_recipe"].write_text(f"model: {w['model']}\ndata:\n  source: {w['data']}\n  task: completion\n"
                                "  prompt_template: '{text.__class__.__mro__[1].__subclasses__}'\n"
                                "  completion_template: '{text}'\n")
    w["open_quote_csv"] = root / "open-quote.csv"
    w["open_quote_csv"].write_text("text\n" + "".join(f"the dog number {i} ran home.\n" for i in range(1, 2)) +
                                   '"the cat ran to the red house.\n' +
                                   "".join(f"the dog number {i} ran home.\n" for i in range(3, 24)), encoding="utf-8")
    good = "".join(json.dumps({"text": f"the dog number {i} ran to the red house."}) + "\n" for i in range(2))
    w["nan_text"] = root / "nan-text.jsonl"
    w["nan_text"].write_text(good + '{"text": NaN}\n' + good * 10, encoding="utf-8")
    w["number_text"] = root / "number-text.jsonl"
    w["number_text"].write_text(good + '{"text": 12345}\n' + good * 10, encoding="utf-8")


def _chat_world(w: dict[str, Path], root: Path) -> None:
    """A chat recipe on the tiny Qwen3 (its BPE has no chat template: the recipe names one ending turns
    with </s>), its data, and broken conversations on line 2 of their files."""
    good = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "runs home"}]}

    def chat_file(name: str, second: dict) -> Path:
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in (good, second)), encoding="utf-8")
        return path

    w["chat_data"] = chat_file("chat.jsonl", good)
    w["chat_bad_role"] = chat_file("chat-bad-role.jsonl", {"messages": [{"role": "wizard", "content": "hi"}]})
    w["chat_no_content"] = chat_file("chat-no-content.jsonl", {"messages": [{"role": "user", "content": "a"},
                                                                            {"role": "assistant"}]})
    w["chat_not_list"] = chat_file("chat-not-list.jsonl", {"messages": "hello"})
    w["chat_template"] = root / "turns.jinja"
    w["chat_template"].write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}assistant: {% endif %}")
    w["raising_template"] = root / "raising.jinja"
    w["raising_template"].write_text("{{ raise_exception('this template takes no assistant turns') }}")
    w["plain_template"] = root / "plain.jinja"
    w["plain_template"].write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    w["chat_recipe"] = root / "chat.yaml"
    w["chat_recipe"].write_text(f"model: {w['qwen3']}\nout_dir: {root / 'chat-run'}\ndata:\n  source: {w['chat_data']}"
                                f"\n  task: chat\n  chat_template: {w['chat_template']}\nseq_len: 32\n")


def _family_world(w: dict[str, Path], root: Path) -> None:
    """A tiny Qwen3 (sharded, with a real byte-level BPE of 320 tokens) and its broken variants."""
    from family_models import save_family, write_small_tokenizer

    def variant(name: str, edit) -> Path:
        d = root / name
        shutil.copytree(w["qwen3"], d)
        edit(d)
        return d

    def edit_config(d: Path, **fields) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **fields}))

    w["qwen3"] = root / "qwen3"
    save_family("qwen3", root / "qwen3-unsharded").save_pretrained(w["qwen3"], max_shard_size="100KB")
    write_small_tokenizer(w["qwen3"])
    shards = sorted(w["qwen3"].glob("model-*.safetensors"))
    assert len(shards) > 2 and not (w["qwen3"] / "model.safetensors").exists()
    w["missing_shard"] = variant("missing-shard", lambda d: (d / shards[1].name).unlink())
    w["rope_foo"] = variant("rope-foo", lambda d: edit_config(d, rope_parameters={"rope_type": "foo",
                                                                                  "rope_theta": 1e4}))
    w["mamba"] = variant("mamba", lambda d: edit_config(d, model_type="mamba", architectures=["MambaForCausalLM"]))
    w["big_tokenizer"] = variant("big-tokenizer", lambda d: write_small_tokenizer(d, vocab_size=400))


# (id, argv with {placeholders} from the world and {new} for a fresh path, exit code, stderr must contain)
ROWS = [
    ("train into a non-empty out", ["train", "{recipe}", *WORLD_TRAIN, "--set", "out_dir={root}"], 2,
     "exists and is not empty"),
    ("train resume with another batch size", ["train", "{recipe}", *WORLD_TRAIN, "--resume", "--set",
                                              "batch_size=8"], 2, "batch_size: 4 -> 8"),
    ("train on empty data", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--data", "{empty}"], 2, "empty"),
    ("train weight_decay=inf", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set", "weight_decay=inf"], 2,
     "weight_decay"),
    ("train lr=1e300", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set", "lr=1e300"], 2, "lr"),
    ("train device=foo", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set", "device=foo"], 2, "device"),
    ("train strategy=zero3", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set", "strategy=zero3"], 2,
     "strategy must be one of ddp, fsdp"),
    ("train device=cuda without a GPU", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set", "device=cuda"],
     2, "no CUDA GPU"),
    ("train out is a file", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{file}"], 2, "is a file"),
    ("train out under a file", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{file}/run"], 2, "a-file.txt"),
    ("train lora.r above the layer width", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set",
                                            "lora.r=100000"], 2, "lora.r"),
    ("train a number in a text field", ["train", "{number_field}", *WORLD_TRAIN[:8], *WORLD_TRAIN[10:], "--out",
                                        "{new}"], 2,
     "text_field"),
    ("train an empty recipe", ["train", "{empty_recipe}", "--out", "{new}"], 2, "empty"),
    ("train a CSV without a header", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--data",
                                      "{headless_csv}"], 2, "header"),
    ("train a missing recipe", ["train", "{root}/no-such.yaml"], 2, "no-such.yaml"),
    ("train an unknown key", ["train", "{recipe}", "--out", "{new}", "--set", "learning_rate=1"], 2, "learning_rate"),
    ("train overwrite with resume", ["train", "{recipe}", *WORLD_TRAIN, "--resume", "--overwrite"], 2, "--overwrite"),
    ("generate with a NaN adapter", ["generate", "--model", "{model}", "--adapter", "{nan_adapter}", "--prompt",
                                     "hello"], 2, "NaN"),
    ("generate with a NaN model", ["generate", "--model", "{nan_model}", "--prompt", "hello"], 2, "NaN"),
    ("serve an adapter without a name", ["serve", "--model", "{model}", "--adapter", "{adapter}"], 2,
     "--adapter takes NAME=DIR"),
    ("serve a NaN adapter", ["serve", "--model", "{model}", "--adapter", "bad={nan_adapter}"], 2, "NaN"),
    ("serve from a missing --adapter-dir", ["serve", "--model", "{model}", "--adapter-dir", "{root}/none"], 2,
     "is not a directory"),
    ("serve with --prefill-tokens 0", ["serve", "--model", "{model}", "--prefill-tokens", "0"], 2, "prefill_tokens"),
    ("serve more adapters than --max-adapters", ["serve", "--model", "{model}", "--adapter", "a={adapter}",
                                                 "--adapter", "b={adapter}", "--max-adapters", "1"], 2,
     "--max-adapters is 1"),
    ("generate a seed beyond 64 bits", ["generate", "--model", "{model}", "--prompt", "hi", "--seed",
                                        str(2**70)], 2, "seed"),
    ("generate past the context", ["generate", "--model", "{model}", "--prompt", "hi", "--max-new-tokens", "100000"],
     0, "context"),
    ("generate a missing adapter", ["generate", "--model", "{model}", "--adapter", "{root}/none", "--prompt", "hi"], 2,
     "does not exist"),
    ("generate with a corrupt loratune_adapter.json", ["generate", "--model", "{model}", "--adapter",
                                                       "{corrupt_extra}", "--prompt", "hi"], 2,
     "loratune_adapter.json"),
    ("generate with a vocabulary smaller than the tokenizer's", ["generate", "--model", "{small_vocab}", "--prompt",
                                                                 "hi"], 2, "vocab"),
    ("eval --json with a NaN model", ["eval", "--model", "{nan_model}", "--data", "{data}", "--text-field", "text",
                                      "--json"], 2, "NaN"),
    ("eval --max-examples -3", ["eval", "--model", "{model}", "--data", "{data}", "--text-field", "text",
                                "--max-examples", "-3"], 2, "max-examples"),
    ("eval --max-examples 0", ["eval", "--model", "{model}", "--data", "{data}", "--text-field", "text",
                               "--max-examples", "0"], 2, "max-examples"),
    ("eval --seq-len past the context", ["eval", "--model", "{model}", "--data", "{data}", "--text-field", "text",
                                         "--seq-len", "100000"], 0, "context"),
    ("merge an adapter into a model it is merged into", ["merge", "--model", "{merged}", "--adapter", "{adapter}",
                                                         "--out", "{new}"], 2, "already"),
    ("merge into a non-empty out", ["merge", "--model", "{model}", "--adapter", "{adapter}", "--out", "{root}"], 2,
     "not empty"),
    ("merge into a file", ["merge", "--model", "{model}", "--adapter", "{adapter}", "--out", "{file}"], 2,
     "a-file.txt"),
    ("merge TIES over adapters of different targets", ["merge", "--model", "{model}", "--adapter", "{adapter}",
                                                       "--adapter", "{half_adapter}", "--combine", "ties", "--density",
                                                       "0.5", "--out", "{new}"], 2, "adapt the same modules"),
    ("merge DARE without a density", ["merge", "--model", "{model}", "--adapter", "{adapter}", "--adapter",
                                      "{half_adapter}", "--combine", "dare_linear", "--out", "{new}"], 2,
     "needs density"),
    ("merge with weights that do not fit", ["merge", "--model", "{model}", "--adapter", "{adapter}", "--adapter",
                                            "{half_adapter}", "--weights", "1", "--out", "{new}"], 2,
     "one per --adapter"),
    ("merge adapters of different targets with cat", ["merge", "--model", "{model}", "--adapter", "{adapter}",
                                                      "--adapter", "{half_adapter}", "--weights", "0.5,0.5", "--out",
                                                      "{new}"], 0, "merged 2 adapter(s)"),
    ("train quantize with full fine-tuning", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set",
                                              "finetune=full", "--set", "quantize=nf4"], 2, "use finetune: lora"),
    ("train an unknown quantize", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set", "quantize=nf3"], 2,
     "quantize must be one of"),
    ("train an unknown lora.init", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set", "lora.init=svd"], 2,
     "unknown LoRA init 'svd'"),
    ("train a negative lora.plus_ratio", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set",
                                          "lora.plus_ratio=-4"], 2, "plus_ratio must be a positive number"),
    ("train activation_offload without checkpointing", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set",
                                                         "activation_offload=true"], 2,
     "activation_checkpointing: true"),
    ("init-model under a file", ["init-model", "--out", "{file}/m"], 2, "a-file.txt"),
    ("init-model with a missing tokenizer", ["init-model", "--out", "{new}", "--tokenizer", "{root}/none"], 2,
     "--tokenizer"),
    ("compare --steps 0", ["compare", "{recipe}", *WORLD_TRAIN[:-1], "--steps", "0"], 2, "steps"),
    ("info on a missing model", ["info", "--model", "{root}/none"], 2, "does not exist"),
    ("info on a missing GGUF", ["info", "--model", "{root}/none.gguf"], 2, "GGUF file not found"),
    ("info on a file that is not GGUF", ["info", "--model", "{not_gguf}"], 2, "is not a GGUF file"),
    ("info on a truncated GGUF", ["info", "--model", "{gguf_cut}"], 2, "is truncated: tensor"),
    ("info on a GGUF of an unsupported architecture", ["info", "--model", "{bert_gguf}"], 2,
     "'bert', which loratune does not read"),
    ("generate with a LoRA GGUF as the model", ["generate", "--model", "{lora_gguf}", "--prompt", "hi"], 2,
     "LoRA adapter GGUF, not a model"),
    ("generate with a LoRA GGUF made for another base", ["generate", "--model", "{gguf}", "--adapter", "{lora_gguf}",
                                                          "--prompt", "the cat"], 2, "llama"),
    ("train quantize: gguf on a safetensors model", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set",
                                                      "quantize=gguf"], 2, "GGUF"),
    ("export GPT-2 to GGUF", ["export", "--model", "{model}", "--format", "gguf", "--out", "{new}.gguf"], 2, "GPT-2"),
    ("export a GGUF onto itself", ["export", "--model", "{gguf}", "--format", "gguf", "--out", "{gguf}",
                                   "--overwrite"], 2, "qwen3.gguf"),
    ("info on a model with .bin and .safetensors", ["info", "--model", "{both_formats}"], 0, "model.safetensors"),
    ("info on an unsupported architecture", ["info", "--model", "{mamba}"], 2, "'mamba' (MambaForCausalLM)"),
    ("info on an unsupported rope type", ["info", "--model", "{rope_foo}"], 2, "rope_type 'foo' is not supported"),
    ("generate from a checkpoint missing a shard", ["generate", "--model", "{missing_shard}", "--prompt", "hi"], 2,
     "shards that"),
    ("generate with a tokenizer larger than the embedding", ["generate", "--model", "{big_tokenizer}", "--prompt",
                                                             "the cat"], 2, "embedding has 320 rows"),
    ("data: a message with an unknown role", ["data", "{chat_recipe}", "--data", "{chat_bad_role}"], 2,
     "line 2: message 0 has the unknown role 'wizard'"),
    ("data: a message without content", ["data", "{chat_recipe}", "--data", "{chat_no_content}"], 2,
     "line 2: message 1 (assistant) has no content"),
    ("data: messages that are not a list", ["data", "{chat_recipe}", "--data", "{chat_not_list}"], 2,
     "line 2: 'messages' must be a non-empty list of messages"),
    ("data: a model without a chat template", ["data", "{chat_recipe}", "--set", "data.chat_template=null"], 2,
     "has no chat template"),
    ("data: a template without an end-of-turn token", ["data", "{chat_recipe}", "--set",
                                                       "data.chat_template={plain_template}"], 2,
     "never learn to stop"),
    ("data --limit -1", ["data", "{chat_recipe}", "--limit", "-1"], 2, "--limit"),
    ("train chat: a template that raises", ["train", "{chat_recipe}", *WORLD_TRAIN[:8], "--out", "{new}", "--set",
                                            "data.chat_template={raising_template}"], 2,
     "line 1: the chat template raised an error for this conversation: this template takes no assistant turns"),
    ("train chat: every conversation cut to nothing", ["train", "{chat_recipe}", *WORLD_TRAIN[:8], "--out", "{new}",
                                                       "--set", "seq_len=3"], 2, "no example with a token to train"),
    ("generate --chat on a model without a template", ["generate", "--chat", "--model", "{qwen3}", "--prompt", "hi"],
     2, "has no chat template"),
    ("generate with an adapter of another family", ["generate", "--model", "{qwen3}", "--adapter", "{adapter}",
                                                    "--prompt", "the cat"], 2, "is an adapter for a GPT-2"),
    ("generate --chat with a template that never ends", ["generate", "--chat", "--model", "{qwen3}", "--chat-template",
                                                          "{loop_template}", "--prompt", "hi"], 2,
     "the chat template ran for more than 2 s"),
    ("train chat: data.template_kwargs sets messages", ["train", "{chat_recipe}", *WORLD_TRAIN[:8], "--out", "{new}",
                                                        "--set", "data.template_kwargs.messages=[]"], 2,
     "data.template_kwargs: 'messages' is set by loratune itself"),
    ("generate --template-var add_generation_prompt", ["generate", "--chat", "--model", "{qwen3}", "--chat-template",
                                                       "{chat_template}", "--prompt", "hi", "--template-var",
                                                       "add_generation_prompt=1"], 2,
     "--template-var: 'add_generation_prompt' is set by loratune itself"),
    ("train a prompt_template with attribute access", ["train", "{attr_recipe}", *WORLD_TRAIN, "--out", "{new}"], 2,
     "is not a plain field name"),
    ("train a CSV with an unterminated quote", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--data",
                                                "{open_quote_csv}"], 2,
     "open-quote.csv, line 3: a quoted field opens on this line and is never closed"),
    ("train a NaN text", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--data", "{nan_text}"], 2,
     "nan-text.jsonl, line 3: field 'text' must be text, got float nan"),
    ("train a number as the text", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--data", "{number_text}"],
     2, "number-text.jsonl, line 3: field 'text' must be text, got int 12345"),
    ("data: a chat template that never ends", ["data", "{chat_recipe}", "--set", "data.chat_template={loop_template}"],
     2, "the chat template ran for more than 2 s"),
    # -- issue 24: templates and data sources --
    ("train --overwrite where --out holds the base model", ["train", "{recipe}", *WORLD_TRAIN, "--model",
                                                            "{model_run}/model", "--out", "{model_run}",
                                                            "--overwrite", "--set", "finetune=full"], 2,
     "holds the model"),
    ("train --overwrite where --out holds the recipe", ["train", "{own_recipe_dir}/recipe.yaml", *WORLD_TRAIN, "--out",
                                                        "{own_recipe_dir}", "--overwrite"], 2, "holds the recipe"),
    ("train --overwrite where --out holds the data", ["train", "{recipe}", *WORLD_TRAIN, "--data",
                                                      "{user_dir}/train.jsonl", "--out", "{user_dir}", "--overwrite"],
     2, "holds the data"),
    ("train --out onto the data through a symlink and ..", ["train", "{recipe}", *WORLD_TRAIN, "--data",
                                                            "{user_link}/train.jsonl", "--out",
                                                            "{user_dir}/../user-dir", "--resume"], 2,
     "holds the data"),
    ("train --overwrite over a user's metrics.jsonl", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{user_dir}",
                                                       "--overwrite"], 2, "which loratune did not write there"),
    ("train --overwrite with a damaged manifest", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{bad_manifest}",
                                                   "--overwrite"], 2, "is not a loratune manifest"),
    ("train --resume with fewer steps than the run reached", ["train", "{run}/recipe.yaml", "--resume", "--max-steps",
                                                              "1", "--no-progress"], 2, "a run cannot go back"),
    ("init-model --out that is the tokenizer", ["init-model", "--tokenizer", "{model}", "--out", "{model}"], 2,
     "exists and is not empty"),
    # -- issue 24: outputs never touch inputs --
    ("train lora.alpha=yes", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set", "lora.alpha=yes"], 2,
     "lora.alpha: expected a number, got the boolean true"),
    ("train data.max_examples=true", ["train", "{recipe}", *WORLD_TRAIN, "--out", "{new}", "--set",
                                      "data.max_examples=true"], 2, "data.max_examples: expected a number"),
    ("train a YAML alias bomb", ["train", "{alias_bomb}", "--out", "{new}"], 2,
     "expands to more than 100,000 values through its YAML aliases"),
    ("generate with an adapter whose logits overflow", ["generate", "--model", "{model}", "--adapter", "{huge_alpha}",
                                                        "--prompt", "hello"], 2, "next-token scores are NaN or Inf"),
    ("eval with an adapter whose logits overflow", ["eval", "--model", "{model}", "--adapter", "{huge_alpha}",
                                                    "--data", "{data}", "--text-field", "text"], 2,
     "computes NaN or Inf although its weights are finite"),
    ("generate an empty prompt", ["generate", "--model", "{model}", "--prompt", ""], 2, "--prompt is empty"),
    ("merge the same adapter twice", ["merge", "--model", "{model}", "--adapter", "{adapter}", "--adapter",
                                      "{run}/adapter/", "--out", "{new}"], 2, "is given twice"),
    ("merge with negative weights", ["merge", "--model", "{model}", "--adapter", "{adapter}", "--adapter",
                                     "{half_adapter}", "--weights", "-1,-0.5", "--out", "{new}"], 0,
     "merged 2 adapter(s)"),
    ("serve --port 70000", ["serve", "--model", "{model}", "--port", "70000"], 2, "must be a TCP port"),
    ("serve --max-batch 10**9", ["serve", "--model", "{model}", "--max-batch", "1000000000"], 2,
     "lower --max-batch or --max-model-len"),
    ("serve --max-queue -1", ["serve", "--model", "{model}", "--max-queue", "-1"], 2, "--max-queue: must be"),
    ("serve --max-tokens -5", ["serve", "--model", "{model}", "--max-tokens", "-5"], 2, "--max-tokens: must be"),
    ("serve --timeout 0", ["serve", "--model", "{model}", "--timeout", "0"], 2, "--timeout: must be"),
    ("serve --timeout -1", ["serve", "--model", "{model}", "--timeout", "-1"], 2, "--timeout: must be"),
    ("serve --timeout nan", ["serve", "--model", "{model}", "--timeout", "nan"], 2, "--timeout: must be"),
    ("serve --max-model-len 0", ["serve", "--model", "{model}", "--max-model-len", "0"], 2, "--max-model-len: must be"),
    ("serve --max-prompt-tokens 0", ["serve", "--model", "{model}", "--max-prompt-tokens", "0"], 2,
     "--max-prompt-tokens: must be"),
    ("serve --max-body-bytes 0", ["serve", "--model", "{model}", "--max-body-bytes", "0"], 2,
     "--max-body-bytes: must be"),
    # -- issue 24: recipes, generate, merge, launch settings --
]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.slow
def test_bad_input(row, world, tmp_path):
    _, argv, code, needle = row
    paths = {k: str(v) for k, v in world.items()}
    args = [a.format(**paths, new=str(tmp_path / "new")) for a in argv]
    before = _digests(world["root"])
    proc = subprocess.run([sys.executable, "-m", "loratune", *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    said = [line for line in proc.stderr.splitlines() if needle in line]
    print(f"\nROW | {row[0]} | exit {proc.returncode} | {said[-1] if said else ''}")  # RELIABILITY.md's table (-s)
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert needle in proc.stderr, proc.stderr[-2000:]
    if code:
        errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1, proc.stderr[-2000:]  # one line says what is wrong
    assert _digests(world["root"]) == before, "a file that existed before was changed"


def test_the_table_covers_every_command():
    from loratune.cli import COMMANDS

    names = {m.__name__.rsplit(".", 1)[-1].replace("_", "-").replace("evaluate", "eval") for m in COMMANDS}
    assert names <= {row[1][0] for row in ROWS}
