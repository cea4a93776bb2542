"""The Ollama ``Modelfile`` written beside an exported GGUF, so ``ollama create NAME -f Modelfile`` runs it.

Ollama does not run the model's Jinja chat template: its ``TEMPLATE`` is a Go template over
``.Messages`` (each with ``.Role`` and ``.Content``). So the chat template is recognized by its
markers and written as the Go template of that shape, in the form of Ollama's own library templates:

- ChatML (``<|im_start|>``: SmolLM2, Qwen); a default system prompt the template inserts (SmolLM2's
  "You are a helpful AI assistant named SmolLM...") becomes the Modelfile's ``SYSTEM``, which Ollama
  puts first in a conversation that has none;
- Llama 3 headers (``<|start_header_id|>``);
- Gemma turns (``<start_of_turn>``), the system text before the first user turn as Gemma's own template
  puts it.

Another template is written as none, with a comment saying so (Ollama then sends the raw prompt).
Each end-of-turn and end-of-text token becomes a ``PARAMETER stop``. BOS is not in the templates:
llama.cpp adds it as the GGUF's ``tokenizer.ggml.add_bos_token`` says.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

MODELFILE = "Modelfile"

CHATML = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

LLAMA3 = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

GEMMA = """{{- $prefix := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ $prefix = printf "%s\\n\\n" .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ $prefix }}{{ .Content }}<end_of_turn>
{{ $prefix = "" }}{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

SHAPES = (("ChatML", "<|im_start|>", CHATML, "<|im_end|>"),
          ("Llama 3", "<|start_header_id|>", LLAMA3, "<|eot_id|>"),
          ("Gemma", "<start_of_turn>", GEMMA, "<end_of_turn>"))
"""(name, the marker that tells the chat template's shape, its Go template, its end-of-turn token)."""

_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^<>{}'\"\\\n]+)<\|im_end\|>")
"""A default system prompt written into a ChatML Jinja template as a literal (SmolLM2's, Qwen2.5's)."""


def template_shape(chat_template: str | None) -> tuple[str, str, str] | None:
    """(shape name, Go template, end-of-turn token) of a Jinja chat template, or None when it is none we know."""
    if not chat_template:
        return None
    for name, marker, go, end in SHAPES:
        if marker in chat_template:
            return name, go, end
    return None


def default_system(chat_template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when a conversation has none, or None."""
    found = _CHATML_SYSTEM.search(chat_template or "")
    return found.group(1) if found else None


def stop_tokens(meta: dict[str, Any], end_of_turn: str | None) -> list[str]:
    """The texts Ollama stops on: the template's end-of-turn token and the GGUF's eos / eot / eom tokens."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    stops = [end_of_turn] if end_of_turn else []
    for key in ("eos", "eot", "eom"):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < len(tokens):
            stops.append(tokens[tid])
    return [s for s in dict.fromkeys(stops) if s]


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(model_from: str, meta: dict[str, Any], adapter: str | None = None) -> str:
    """The Modelfile: ``FROM model_from`` (and ``ADAPTER adapter``), the template and stops from ``meta``
    (the GGUF's ``tokenizer.*`` metadata: tokens, special ids, ``tokenizer.chat_template``)."""
    chat_template = meta.get("tokenizer.chat_template")
    shape = template_shape(chat_template if isinstance(chat_template, str) else None)
    lines = ["# Ollama Modelfile written by loratune export: ollama create NAME -f Modelfile", f"FROM {model_from}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    if shape is None:
        why = "has no chat template" if not chat_template else "has a chat template of a shape loratune does not " \
              "translate (it knows ChatML, Llama 3 and Gemma)"
        lines.append(f"# No TEMPLATE: the model {why}; Ollama sends prompts as they are. Write one by hand "
                     "(https://github.com/ollama/ollama/blob/main/docs/template.md) for chat.")
    else:
        name, go, end = shape
        lines.append(f"# TEMPLATE: the {name} chat template as a Go template")
        lines.append(f'TEMPLATE """{go}"""')
        system = default_system(chat_template) if name == "ChatML" else None
        if system:
            lines.append(f'SYSTEM """{system}"""')
    for stop in stop_tokens(meta, shape[2] if shape else None):
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    return "\n".join(lines) + "\n"


def relative_from(target: Path, directory: Path) -> str:
    """How the Modelfile in ``directory`` names ``target``: ``./name`` beside it, else the absolute path."""
    target, directory = Path(target).resolve(), Path(directory).resolve()
    return f"./{target.name}" if target.parent == directory else str(target)


def write_modelfile(directory: Path, model_from: Path, meta: dict[str, Any], adapter: Path | None = None) -> Path:
    """Write ``directory/Modelfile`` (complete or absent) naming ``model_from`` (and ``adapter``); returns it."""
    text = modelfile_text(relative_from(model_from, directory), meta,
                          relative_from(adapter, directory) if adapter is not None else None)
    out = Path(directory) / MODELFILE
    tmp = out.with_name(f".tmp-{MODELFILE}-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
