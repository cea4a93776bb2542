"""Tokenizers through the ``tokenizers`` library, read from a model directory's files as
transformers' ``AutoTokenizer`` reads them.

``tokenizer.json`` is read, then adjusted as transformers 5 adjusts it when it loads it:

- the tokenizer classes in :data:`_CLASSES` (named by ``tokenizer_class`` in tokenizer_config.json)
  rebuild the normalizer, pre-tokenizer, decoder and BPE settings in their own way. For a
  SentencePiece-style ``LlamaTokenizer`` (Llama 2, Mistral) this changes ids: the file's
  "prepend ▁, spaces -> ▁" normalizer becomes a Metaspace pre-tokenizer that prepends ▁ only where
  the text does not already start with a space (``legacy: true``: to every piece between special
  tokens, else to the first only). A byte-level tokenizer.json that names LlamaTokenizer is read
  as it is (Llama 3 variants), as transformers does; so is any tokenizer.json of a family whose
  spec says ``tokenizer_as_saved`` (Mistral: transformers ignores the tokenizer_class there);
- the post-processor (what ``encode(text, add_special=True)`` adds, e.g. BOS) is the file's:
  transformers ignores ``add_bos_token`` / ``add_eos_token`` when a tokenizer.json is present;
- the named special tokens (bos, eos, unk, sep, pad, cls, mask, additional and extra special
  tokens, with the class's defaults) are marked special, so ``decode(ids, skip_special=True)``
  drops them as transformers' decode does;
- ``clean_up_tokenization_spaces`` is applied to decoded text for non-BPE models only: transformers
  ignores it for BPE (Llama 3's tokenizer_config.json sets it).

Without tokenizer.json, a byte-level BPE is built from ``vocab.json`` + ``merges.txt`` (GPT-2's
original files). The end-of-text token is found, in this order, in ``tokenizer_config.json``
(``eos_token``, or the tokenizer class's default), in ``config.json`` (``eos_token_id``), or from
the model family's spec; the padding token likewise (``pad_token``), falling back to end-of-text.
Generation also stops on every ``eos_token_id`` of ``generation_config.json`` and ``config.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, DataError
from .jsonfiles import json_or_empty as _json_or_empty
from .jsonfiles import token_text as _token_text


class Tokenizer:
    """Encode text to ids and back; ``eos_id`` ends a document, ``pad_id`` fills batches.

    ``bos_id`` is the id transformers' ``tokenizer(text)`` puts first (None where it puts none, as
    for GPT-2 and Qwen); ``eos_ids`` are the ids generation stops on, ``eos_id`` first.
    """

    def __init__(self, backend, eos_id: int, pad_id: int | None = None, eos_ids: Sequence[int] = (),
                 clean_up_spaces: bool = False) -> None:
        self.backend = backend
        self.eos_id: int = eos_id
        self.pad_id: int = eos_id if pad_id is None else pad_id
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys([eos_id, *eos_ids]))
        self.bos_id: int | None = _prepended_id(backend)
        self.clean_up_spaces = clean_up_spaces
        self.id_limit: int | None = None
        """Ids from here on have no embedding row (see :meth:`limit_ids`); text producing one is refused."""
        self.chat_template: str | None = None
        """The model directory's chat template (chat_template.jinja or tokenizer_config.json), if it has one."""
        self.source = "the model"
        """Where the tokenizer was read from, for messages."""
        self.special_texts: dict[str, str] = {}
        """bos_token, eos_token ... as text, the variables a chat template reads."""

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def base_vocab_size(self) -> int:
        """Tokens of the model proper, without the tokens added on top (special and control tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def limit_ids(self, rows: int) -> list[str]:
        """Refuse, from now on, text that encodes to an id >= ``rows``; returns those tokens' texts.

        Why: Gemma 3's tokenizer lists ``<image_soft_token>`` at id 262,144, one past the text
        models' embedding; transformers loads the pair, and only text naming that token breaks.
        """
        self.id_limit = rows
        return [self.backend.id_to_token(i) or str(i) for i in range(rows, self.vocab_size)]

    def _checked(self, ids: list[int]) -> list[int]:
        if self.id_limit is not None and ids and max(ids) >= self.id_limit:
            bad = next(i for i in ids if i >= self.id_limit)
            raise DataError(f"the text contains {self.backend.id_to_token(bad)!r} (id {bad}), a token this model "
                            f"has no embedding row for (its vocabulary has {self.id_limit} rows): remove it from "
                            "the text")
        return ids

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds what transformers' ``tokenizer(text)`` adds (BOS)."""
        return self._checked(self.backend.encode(text, add_special_tokens=add_special).ids)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no special tokens added) and each token's (start, end) characters in it."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return self._checked(enc.ids), [tuple(o) for o in enc.offsets]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (<|im_end|>, <|eot_id|>, </s> ...)."""
        return frozenset(i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special)

    def encode_batch(self, texts: list[str], add_special: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [self._checked(e.ids) for e in self.backend.encode_batch(texts, add_special_tokens=add_special)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of token ids, as transformers' ``decode`` gives it (``skip_special``: without special tokens)."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special)
        return _clean_up_spaces(text) if self.clean_up_spaces else text


def _prepended_id(backend) -> int | None:
    """The first id the post-processor puts before the text, if any."""
    enc = backend.encode("a", add_special_tokens=True)
    return enc.ids[0] if enc.ids and enc.special_tokens_mask[0] else None


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization (it applies it to non-BPE models only)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# --- what transformers 5's tokenizer classes do to a tokenizer.json --------------------------------

_BPE_DEFAULTS = {"dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                 "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _set_bpe(backend, **settings: Any) -> None:
    """Give the BPE model the settings of a ``BPE(vocab, merges, **settings)``, as a class rebuilds it."""
    for name, value in {**_BPE_DEFAULTS, **settings}.items():
        if hasattr(backend.model, name):
            setattr(backend.model, name, value)


def _rebuild_llama(backend, tok_config: dict[str, Any]) -> None:
    from tokenizers import decoders, pre_tokenizers

    prefix = tok_config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if tok_config.get("legacy", False) else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    _set_bpe(backend, fuse_unk=True, byte_fallback=True)


def _rebuild_gemma(backend, tok_config: dict[str, Any]) -> None:
    from tokenizers import decoders, normalizers, pre_tokenizers

    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    unk = _token_text(tok_config.get("unk_token", "<unk>"))
    _set_bpe(backend, fuse_unk=True, byte_fallback=True, unk_token=unk)


def _rebuild_qwen2(backend, tok_config: dict[str, Any]) -> None:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_config.get("add_prefix_space")), use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    _set_bpe(backend, continuing_subword_prefix="", end_of_word_suffix="")


@dataclass(frozen=True)
class _TransformersClass:
    """What one of transformers 5's tokenizer classes does when it loads a tokenizer.json."""

    rebuild: Callable[[Any, dict[str, Any]], None]
    """Rebuilds normalizer, pre-tokenizer, decoder and BPE settings as the class's ``__init__`` does."""
    defaults: dict[str, str] = field(default_factory=dict)
    """Special tokens the class names where tokenizer_config.json does not."""
    byte_level_as_is: bool = False
    """A byte-level tokenizer.json naming this class is read as it is (AutoTokenizer's rule)."""


_CLASSES = {
    "LlamaTokenizer": _TransformersClass(_rebuild_llama, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
                                         byte_level_as_is=True),
    "GemmaTokenizer": _TransformersClass(_rebuild_gemma, {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>",
                                                          "pad_token": "<pad>", "mask_token": "<mask>"}),
    # Qwen2Tokenizer's defaults (unk, eos and pad: Qwen's end-of-text) are left out: Qwen's
    # tokenizer_config.json names all three, and the defaults would only decide where it does not.
    "Qwen2Tokenizer": _TransformersClass(_rebuild_qwen2),
}
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _transformers_class(tok_config: dict[str, Any], tok_json: Path) -> _TransformersClass | None:
    name = tok_config.get("tokenizer_class")
    cls = _CLASSES.get(name.removesuffix("Fast")) if isinstance(name, str) else None
    if cls is not None and cls.byte_level_as_is and '"ByteLevel"' in tok_json.read_text(encoding="utf-8"):
        return None
    return cls


def _special(tok_config: dict[str, Any], cls: _TransformersClass | None, key: str) -> str | None:
    """A named special token's text: tokenizer_config.json's (even null), else the class's default."""
    if key in tok_config:
        return _token_text(tok_config[key])
    return cls.defaults.get(key) if cls else None


def _mark_special(backend, tok_config: dict[str, Any], cls: _TransformersClass | None) -> None:
    """Mark the named special tokens special (so decode can skip them), as transformers does on loading."""
    from tokenizers import AddedToken

    extra = tok_config.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    texts = [_special(tok_config, cls, k) for k in _NAMED_SPECIAL]
    texts += [_token_text(t) for t in [*(tok_config.get("additional_special_tokens") or []), *extra]]
    added = {str(t): t for t in backend.get_added_tokens_decoder().values()}
    tokens = []
    for text in dict.fromkeys(t for t in texts if t and backend.token_to_id(t) is not None):
        old = added.get(text)
        if old is None:  # in the model's vocabulary only: transformers adds it as a special token
            tokens.append(AddedToken(text, special=True, normalized=False))
        elif not old.special:
            tokens.append(AddedToken(text, single_word=old.single_word, lstrip=old.lstrip, rstrip=old.rstrip,
                                     normalized=old.normalized, special=True))
    if tokens:
        backend.add_tokens(tokens)


# --- loading ---------------------------------------------------------------------------------------

def _eos_candidates(tok_config: dict[str, Any], config: dict[str, Any], cls: _TransformersClass | None) -> list[str]:
    """End-of-text texts to look for: the tokenizer's own, else the family's; with neither and no
    eos_token_id in config.json (a bare vocab.json + merges.txt), any known family's."""
    from ..models.registry import FAMILIES, find_family

    named = _special(tok_config, cls, "eos_token")
    if named:
        return [named]
    family = find_family(config.get("model_type"))
    if family and family.eos_token:
        return [family.eos_token]
    if config.get("eos_token_id") is not None:
        return []
    return [f.eos_token for f in FAMILIES.values() if f.eos_token]


def _build_bpe(vocab: Path, merges: Path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors

    backend = Backend(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _ids(backend, value: Any) -> list[int]:
    """The valid token ids of a config's ``eos_token_id`` (an int or a list of them)."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < backend.get_vocab_size()]


def _special_id(backend, text: str | None, config_id: Any) -> int | None:
    if text is not None and backend.token_to_id(text) is not None:
        return backend.token_to_id(text)
    return next(iter(_ids(backend, config_id)), None)


def _read_backend(model_dir: Path, tok_config: dict[str, Any], as_saved: bool = False):
    """The ``tokenizers`` backend as transformers loads it, and its transformers class (None: as read;
    ``as_saved``: the model's family reads tokenizer.json as saved, whatever tokenizer_class says)."""
    from tokenizers import Tokenizer as Backend

    tok_json = model_dir / "tokenizer.json"
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    try:
        if tok_json.is_file():
            backend = Backend.from_file(str(tok_json))
            cls = None if as_saved else _transformers_class(tok_config, tok_json)
            if cls is not None and type(backend.model).__name__ == "BPE":
                cls.rebuild(backend, tok_config)
            _mark_special(backend, tok_config, cls)
            backend.encode_special_tokens = bool(tok_config.get("split_special_tokens", False))
            return backend, cls
        if vocab.is_file() and merges.is_file():
            return _build_bpe(vocab, merges), None
    except Exception as exc:  # noqa: BLE001  (tokenizers raises plain Exception for a file it cannot parse)
        raise CheckpointError(f"could not read the tokenizer in {model_dir}: {exc}") from None
    raise CheckpointError(f"no tokenizer in {model_dir}: expected tokenizer.json, or vocab.json and merges.txt")


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The model directory's tokenizer, as transformers' AutoTokenizer reads it (tokenizer.json), or a
    byte-level BPE from vocab.json + merges.txt."""
    model_dir = Path(model_dir)
    tok_config = _json_or_empty(model_dir / "tokenizer_config.json")
    config = _json_or_empty(model_dir / "config.json")
    from ..models.registry import find_family

    family = find_family(config.get("model_type"))
    backend, cls = _read_backend(model_dir, tok_config, as_saved=bool(family and family.tokenizer_as_saved))
    candidates = _eos_candidates(tok_config, config, cls)
    eos_text = next((t for t in candidates if backend.token_to_id(t) is not None), None)
    if eos_text is not None and not (model_dir / "tokenizer.json").is_file():
        backend.add_special_tokens([eos_text])  # vocab.json lists it; this keeps it whole when encoding text
    eos = _special_id(backend, eos_text, config.get("eos_token_id"))
    if eos is None:
        raise CheckpointError(f"the tokenizer in {model_dir} has no end-of-text token "
                              f"(looked for {', '.join(candidates) or 'none named'}, and no "
                              "eos_token_id in config.json): is it this model's tokenizer?")
    pad = _special_id(backend, _special(tok_config, cls, "pad_token"), config.get("pad_token_id"))
    generation = _json_or_empty(model_dir / "generation_config.json")
    stops = _ids(backend, generation.get("eos_token_id")) + _ids(backend, config.get("eos_token_id"))
    clean_up = bool(tok_config.get("clean_up_tokenization_spaces")) and type(backend.model).__name__ != "BPE"
    tokenizer = Tokenizer(backend, eos, pad, eos_ids=stops, clean_up_spaces=clean_up)
    from .chat_template import read_chat_template, special_tokens

    tokenizer.chat_template, tokenizer.special_texts = read_chat_template(model_dir), special_tokens(model_dir)
    tokenizer.source = str(model_dir)
    return tokenizer
