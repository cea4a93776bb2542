"""Hugging Face tokenizer files -> a GGUF's ``tokenizer.*`` metadata, for export (the reverse of
:mod:`loratune.hub.gguf_tokenizer`).

:func:`gguf_tokenizer_metadata` writes what llama.cpp's ``convert_hf_to_gguf.py`` writes: its
``get_vocab_base`` for byte-level BPE, its SentencePiece vocabulary for byte-fallback BPE, and
gguf-py's ``SpecialVocab`` for special ids, add-BOS/EOS, merges and the chat template.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .gguf_tokenizer import (KEY_PREFIX, GEMMA_ARCHS, GPT4O_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT, QWEN35_SPLIT, SPIECE,
                             TEKKEN_SPLIT, BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED, vocab_kinds)

# llama.cpp's convert_hf_to_gguf.py names a byte-level pre-tokenizer by hashing the ids its
# AutoTokenizer gives this text (with special tokens); the hashes below are those of the families
# loratune covers, copied from its get_vocab_base_pre().
_CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
               "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作"
               "1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told "
               "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
_KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
_SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", TEKKEN_SPLIT: "tekken",
                     GPT4O_SPLIT: "gpt-4o", QWEN35_SPLIT: "qwen35"}
_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                 "sep": "seperator_token_id", "pad": "padding_token_id", "cls": "cls_token_id",
                 "mask": "mask_token_id"}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _looks_special(text: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens it makes control even where not special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _components(node: Any, kind: str) -> list[dict]:
    """Every component of a tokenizer.json part (normalizer, pre-tokenizer...) of type ``kind``, in sequences too."""
    if isinstance(node, dict):
        found = [node] if node.get("type") == kind else []
        for child in node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []:
            found += _components(child, kind)
        return found
    return []


def _pre_name(tok_json_path: Path, tok_json: dict[str, Any]) -> str:
    """``tokenizer.ggml.pre`` of a byte-level BPE: llama.cpp's hash of the check text's ids where it is
    one we know, else the name of the split regex, else ``default`` (llama.cpp would refuse)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tok_json_path)).encode(_CHECK_TEXT, add_special_tokens=True).ids
    name = _KNOWN_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())
    if name is not None:
        return name
    pre = tok_json.get("pre_tokenizer")
    for split in _components(pre, "Split"):
        regex = (split.get("pattern") or {}).get("Regex")
        if regex in _SPLIT_NAMES:
            return _SPLIT_NAMES[regex]
    if any(c.get("use_regex", True) for c in _components(pre, "ByteLevel")):
        digits = _components(pre, "Digits")
        return "smollm" if digits and digits[0].get("individual_digits") else "gpt-2"
    return "default"


def _vocab_size(tokenizer_dir: Path, count: int) -> int:
    """The embedding's rows (config.json's vocab_size) where the directory says; llama.cpp writes as many tokens."""
    config = _read_json(tokenizer_dir / "config.json")
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else count


def _special_metadata(tok_json: dict[str, Any], tok_config: dict[str, Any], config: dict[str, Any],
                      size: int) -> dict[str, Any]:
    """gguf-py's SpecialVocab: special ids (tokenizer_config's tokens, then config.json's ids) and
    add-BOS/EOS (the post-processor's template, then tokenizer_config's flags)."""
    out: dict[str, Any] = {}
    added = tok_json.get("added_tokens") or []
    for typ, key in _SPECIAL_KEYS.items():
        entry = tok_config.get(f"{typ}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        tid = next((a.get("id") for a in added if isinstance(text, str) and a.get("content") == text), None)
        if tid is None:
            tid = config.get(f"{typ}_token_id")
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < size:
            out[KEY_PREFIX + key] = tid
    bos, eos = (tok_config.get(k) for k in ("bos_token", "eos_token"))
    bos, eos = (t.get("content") if isinstance(t, dict) else t for t in (bos, eos))
    post = tok_json.get("post_processor") or {}
    sep = tok_config.get("sep_token")
    sep = sep.get("content") if isinstance(sep, dict) else sep
    for proc in post.get("processors", [post]):
        single, pair = proc.get("single", []), proc.get("pair", [])
        if proc.get("type") != "TemplateProcessing" or len(single) < 2:
            continue
        first, last = (single[i].get("SpecialToken", {}).get("id") for i in (0, -1))
        if first:
            out[KEY_PREFIX + "add_bos_token"] = first == bos
        if last:
            out[KEY_PREFIX + "add_eos_token"] = last == eos
        start = 1 if first and pair and pair[0].get("SpecialToken", {}).get("id") == first else 0
        stop = -1 if last and pair and pair[-1].get("SpecialToken", {}).get("id") == last else None
        inner = pair[start:stop]
        if inner and inner[0].get("Sequence", {}).get("id") == "A" and inner[-1].get("Sequence", {}).get("id") == "B" \
                and len(inner) > 2:  # A [sep] [eos] B: SpecialVocab's add_sep
            middle = [e.get("SpecialToken", {}).get("id") for e in inner[1:-1]]
            out[KEY_PREFIX + "add_sep_token"] = bool((middle[0] in (sep, eos) and not last)
                                             or (len(middle) == 2 and middle[1] in (sep, eos)))
    for typ in ("bos", "eos"):
        if isinstance(tok_config.get(f"add_{typ}_token"), bool):
            out[KEY_PREFIX + f"add_{typ}_token"] = tok_config[f"add_{typ}_token"]
    return out


def _scores(tokens: list[str], types: list[int], merges: list[Sequence[str]]) -> list[float]:
    """SentencePiece scores that order the merges as tokenizer.json does: a normal token scores minus
    the rank of the first merge that makes it (tokens no merge makes score below all of those, in
    id order); bytes 0, control and user-defined tokens -1000, as llama.cpp writes them."""
    made: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        made.setdefault(left + right, rank)
    scores, unmade = [], len(merges)
    for token, kind in zip(tokens, types):
        if kind == NORMAL:
            if token in made:
                scores.append(-float(made[token]))
            else:
                scores.append(-float(unmade))
                unmade += 1
        else:
            scores.append(0.0 if kind == BYTE else -1000.0)
    return scores


def gguf_tokenizer_metadata(tokenizer_dir: Path, arch: str) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF metadata of a Hugging Face tokenizer directory, as llama.cpp's converter writes it.

    A byte-level BPE becomes ``gpt2`` (tokens, types, merges, ``pre`` named as described in
    :func:`_pre_name`); a byte-fallback BPE with ▁ for spaces (Llama 2, Mistral, Gemma) becomes
    ``llama`` with SentencePiece scores: -rank for normal tokens in id order (the order
    SentencePiece scores them in: transformers rebuilds the same merges from them), 0 for bytes,
    -1000 for control and user-defined tokens, as llama.cpp's SentencePiece path writes them.
    Tokens are padded with ``[PADn]`` (unused) or cut to config.json's ``vocab_size``, as llama.cpp does.
    """
    tokenizer_dir = Path(tokenizer_dir)
    tok_path = tokenizer_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"no tokenizer.json in {tokenizer_dir}: a GGUF's tokenizer is written from one")
    tok_json, tok_config = _read_json(tok_path), _read_json(tokenizer_dir / "tokenizer_config.json")
    model = tok_json.get("model") or {}
    byte_level = bool(_components(tok_json.get("pre_tokenizer"), "ByteLevel")
                      or _components(tok_json.get("decoder"), "ByteLevel"))
    spiece = model.get("byte_fallback") and not byte_level
    if model.get("type") != "BPE" or not (byte_level or spiece):
        raise CheckpointError(f"cannot write the tokenizer in {tokenizer_dir} to GGUF: only byte-level BPE (gpt2) "
                              f"and byte-fallback BPE (llama) are supported, this is a {model.get('type')} model")
    vocab: dict[str, int] = model.get("vocab") or {}
    added = {a["id"]: a for a in tok_json.get("added_tokens") or []}
    by_id = {i: t for t, i in vocab.items()}
    count = max([*by_id, *added, -1]) + 1
    size = _vocab_size(tokenizer_dir, count)

    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        if i in added:
            text, special = added[i]["content"], added[i].get("special", False)
            kind = CONTROL if special or _looks_special(text) else USER_DEFINED
            tokens.append(text if kind == CONTROL else text.replace(SPIECE, " "))
        elif i in by_id:
            text = by_id[i]
            kind = BYTE if spiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else NORMAL
            tokens.append(text)
        else:
            tokens.append(f"[PAD{i}]")
            kind = UNUSED
        types.append(kind)

    byte_bpe, spiece_bpe = vocab_kinds()
    meta: dict[str, Any] = {KEY_PREFIX + "model": spiece_bpe if spiece else byte_bpe,
                            KEY_PREFIX + "pre": "default" if spiece else _pre_name(tok_path, tok_json),
                            KEY_PREFIX + "tokens": tokens, KEY_PREFIX + "token_type": types}
    merges = model.get("merges") or []
    if spiece:
        meta[KEY_PREFIX + "scores"] = _scores(tokens, types, [m.split(" ", 1) if isinstance(m, str) else m for m in merges])
    else:  # gguf-py's SpecialVocab: a space inside a merge's token is spelled U+0120, as byte-level BPE spells it
        meta[KEY_PREFIX + "merges"] = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m)
                               for m in merges]
    meta.update(_special_metadata(tok_json, tok_config, _read_json(tokenizer_dir / "config.json"), size))
    if arch in GEMMA_ARCHS:
        meta[KEY_PREFIX + "add_space_prefix"] = False  # llama.cpp's Gemma converters write it
    template = tok_config.get("chat_template")
    jinja = tokenizer_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = template
    return meta

