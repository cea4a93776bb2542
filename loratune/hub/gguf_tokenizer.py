"""A GGUF file's tokenizer metadata -> Hugging Face tokenizer files (the reverse, for export, is
:mod:`loratune.hub.gguf_vocab`).

A GGUF has no tokenizer.json: llama.cpp's converter stores the vocabulary, its types, the merges
(byte-level BPE) or scores (SentencePiece-style BPE), the special token ids, add-BOS and the chat
template as ``tokenizer.*`` metadata. 
:func:`tokenizer_files` builds, from that metadata, the tokenizer.json and tokenizer_config.json
  that transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` would hold: the same
  builder per ``tokenizer.ggml.model`` (and per architecture for Gemma and Phi-3), the same
  derived merges, special and added tokens, and post-processor, reproduced with the ``tokenizers``
  library. The tokenizer.json is final (``tokenizer_class: TokenizersBackend``), so
  ``loratune.data.tokenizer.load_tokenizer`` and transformers both read it as it is. One quirk is
  left out: transformers' byte-level builder appends its default end-of-text token as a new id
  past the vocabulary where the file lacks it (Llama 3), an id no embedding row backs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
"""llama.cpp's token types (``tokenizer.ggml.token_type``)."""


def vocab_kinds() -> tuple[str, str]:
    """llama.cpp's ``tokenizer.ggml.model`` names for byte-level BPE and for SentencePiece-style BPE (the
    two read and written here), as gguf-py's vocabulary classes spell them."""
    try:
        from gguf.vocab import BpeVocab, SentencePieceVocab
    except ImportError:
        raise CheckpointError("GGUF tokenizers need gguf-py, llama.cpp's Python package: pip install gguf") from None
    return BpeVocab.tokenizer_model, SentencePieceVocab.tokenizer_model


KEY_PREFIX = "tokenizer.ggml."
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3_text")
SPIECE = "\u2581"

# The pre-tokenizer splits transformers applies for a ``tokenizer.ggml.pre`` name (byte-level BPE).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), LLAMA3_SPLIT),
    "tekken": TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), QWEN2_SPLIT),
    "qwen35": QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), GPT4O_SPLIT),
}
"""``tokenizer.ggml.pre`` -> the split regex transformers uses; other names keep GPT-2's byte-level regex."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level BPE spells its tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# --- GGUF -> tokenizer files -------------------------------------------------------------------------

def _fail(message: str) -> CheckpointError:
    return CheckpointError(f"the GGUF's tokenizer metadata {message}")


def _list(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], size: int | None) -> list | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise _fail(f"has a malformed {key} (expected a list of {getattr(kind, '__name__', 'numbers')})")
    if size is not None and len(value) != size:
        raise _fail(f"has {len(value)} entries in {key} for {size} tokens")
    return list(value)


def _token_id(meta: dict[str, Any], key: str, size: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise _fail(f"sets {key} = {value!r}, not a token id (the vocabulary has {size} tokens)")
    return value


def _derived_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a vocabulary implies, as transformers' ``generate_merges`` orders them: every split
    of a token into two vocabulary pieces, the best-scored token's first (then longer left pieces)."""
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _file_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise _fail(f"has a merge {bad!r} that is not two tokens separated by one space")
    return pairs  # type: ignore[return-value]


def _byte_level(tokens: list[str], merges: list[str] | None):
    """transformers' GPT2Tokenizer over the file's vocabulary (tokens outside the byte alphabet respelled)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if merges is None:
        raise _fail("of a byte-level BPE (tokenizer.ggml.model gpt2) has no tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_file_merges(merges), dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens: list[str], merges: list[tuple[str, str]]):
    """transformers' LlamaTokenizer (legacy=False: ▁ prepended to the first piece only), byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def _sentencepiece_merges(tokens: list[str], merges: list[str] | None, scores: list[float] | None):
    if merges is not None:
        return _file_merges(merges)
    if scores is None:
        raise _fail("of a SentencePiece-style BPE has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    return _derived_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))


def _gemma(tokens: list[str], merges: list[str] | None):
    """transformers' GemmaTokenizer: multi-space tokens respelled with ▁, merges from token order."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = [SPIECE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = _file_merges(merges) if merges is not None else _derived_merges(
        vocab, {t: -i for i, t in enumerate(tokens)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, unk_token="<unk>", dropout=None,
                                   byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.normalizer = normalizers.Replace(" ", SPIECE)
    return backend


def _add_missing_special(backend, texts: Sequence[str | None]) -> None:
    """Add named special tokens not yet added (a tokenizer class's ``__init__`` does; an absent one
    gets a new id past the vocabulary, as in transformers)."""
    from tokenizers import AddedToken

    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = [t for t in dict.fromkeys(texts) if t and t not in added]
    if new:
        backend.add_tokens([AddedToken(t, special=True) for t in new])


def _add_typed_tokens(backend, tokens: list[str], types: list[int] | None, byte_level: bool) -> None:
    """Control tokens (3) special, user-defined ones (4) plain added tokens, as transformers adds them.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp
    mislabel; transformers skips it (adding it would grow the vocabulary), and so do we.
    """
    from tokenizers import AddedToken

    if not types:
        return
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)


def _post_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
                    add_bos: bool, add_eos: bool):
    """transformers' ``update_post_processor``: BOS and/or EOS around each sequence, as the flags say."""
    from tokenizers import processors

    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"sets {key} = {value!r}, not true or false")
    return value


def tokenizer_files(meta: dict[str, Any]) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) as dicts, for the tokenizer a GGUF's metadata describes.

    ``meta`` maps each metadata key to a plain value (``GGUFReader`` fields' ``contents()``). The
    result is the tokenizer ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds, token for
    token: written beside a config.json it loads in transformers and in ``load_tokenizer`` alike.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    byte_bpe, spiece_bpe = vocab_kinds()
    model = meta.get(KEY_PREFIX + "model")
    if model not in (byte_bpe, spiece_bpe):
        raise CheckpointError(f"the GGUF's tokenizer model {model!r} (tokenizer.ggml.model) is not supported: "
                              f"supported are {byte_bpe} (byte-level BPE) and {spiece_bpe} (SentencePiece-style BPE)")
    tokens = _list(meta, KEY_PREFIX + "tokens", str, None)
    if not tokens:
        raise _fail("has no token list (tokenizer.ggml.tokens)")
    size = len(tokens)
    types = _list(meta, KEY_PREFIX + "token_type", int, size)
    scores = _list(meta, KEY_PREFIX + "scores", (int, float), size)
    merges = _list(meta, KEY_PREFIX + "merges", str, None)
    arch = str(meta.get("general.architecture", ""))
    ids = {name: _token_id(meta, KEY_PREFIX + key, size) for name, key in _SPECIAL_IDS.items()}
    texts = {name: (tokens[i] if i is not None else None) for name, i in ids.items()}
    add_bos = _flag(meta, KEY_PREFIX + "add_bos_token", model == spiece_bpe)  # llama.cpp's default for SentencePiece
    add_eos = _flag(meta, KEY_PREFIX + "add_eos_token", False)
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise _fail("has a tokenizer.chat_template that is not text")

    try:
        if model == byte_bpe:
            # transformers' GPT2Tokenizer also adds its default end-of-text token, as a new id where the
            # vocabulary lacks it (Llama 3): an id without an embedding row that llama.cpp never makes. Left out.
            backend, defaults = _byte_level(tokens, merges), []
        elif arch in GEMMA_ARCHS:
            backend, defaults = _gemma(tokens, merges), ["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"]
        else:
            backend, defaults = _sentencepiece(tokens, _sentencepiece_merges(tokens, merges, scores)), [
                "<s>", "</s>", "<unk>"]
            if arch == "phi3":  # no Phi3Tokenizer: the prefix space comes from a normalizer (transformers)
                backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE),
                                                           normalizers.Replace(" ", SPIECE)])
                backend.pre_tokenizer = None
        _add_missing_special(backend, defaults)  # the builder class's own defaults
        _add_typed_tokens(backend, tokens, types, byte_level=model == byte_bpe)
        split = PRE_TOKENIZER_SPLITS.get(meta.get(KEY_PREFIX + "pre"))
        if split is not None:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        # then AutoTokenizer's class for the architecture adds the named tokens (Gemma's: <mask> too)
        mask = "<mask>" if arch in GEMMA_ARCHS else None
        _add_missing_special(backend, [texts["bos_token"], texts["eos_token"], texts["unk_token"],
                                       texts["pad_token"], mask])
        backend.post_processor = _post_processor(texts["bos_token"], backend.token_to_id(texts["bos_token"] or ""),
                                                 texts["eos_token"], backend.token_to_id(texts["eos_token"] or ""),
                                                 add_bos, add_eos)
        tokenizer_json = json.loads(backend.to_str())
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001  (tokenizers raises plain Exception on bad vocab or merges)
        raise _fail(f"does not make a tokenizer: {exc}") from None

    config: dict[str, Any] = {"tokenizer_class": "TokenizersBackend", **texts,
                              "add_bos_token": add_bos and texts["bos_token"] is not None,
                              "add_eos_token": add_eos and texts["eos_token"] is not None,
                              "clean_up_tokenization_spaces": False}
    if mask is not None and backend.token_to_id(mask) is not None:
        config["mask_token"] = mask
    if template is not None:
        config["chat_template"] = template
    return tokenizer_json, config
