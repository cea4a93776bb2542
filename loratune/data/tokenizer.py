"""Tokenizers through the ``tokenizers`` library, read from a checkpoint directory's files.

``tokenizer.json`` is read as it is. Without it, a byte-level BPE is built from ``vocab.json`` +
``merges.txt`` (GPT-2's original files). The end-of-text token is found, in this order, in
``tokenizer_config.json`` (``eos_token``), in ``config.json`` (``eos_token_id``), or from the
model family's spec; the padding token likewise (``pad_token``), falling back to end-of-text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


class Tokenizer:
    """Encode text to ids and back; ``eos_id`` ends a document, ``pad_id`` fills batches."""

    def __init__(self, backend, eos_id: int, pad_id: int | None = None) -> None:
        self.backend = backend
        self.eos_id: int = eos_id
        self.pad_id: int = eos_id if pad_id is None else pad_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of token ids."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _eos_candidates(tok_config: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """End-of-text texts to look for: the tokenizer's own, else the family's; with neither and no
    eos_token_id in config.json (a bare vocab.json + merges.txt), any known family's."""
    from ..models.registry import FAMILIES, find_family

    named = _token_text(tok_config.get("eos_token"))
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


def _special_id(backend, text: str | None, config_id: Any) -> int | None:
    if text is not None and backend.token_to_id(text) is not None:
        return backend.token_to_id(text)
    if isinstance(config_id, list) and config_id:
        config_id = config_id[0]
    if isinstance(config_id, int) and not isinstance(config_id, bool) and 0 <= config_id < backend.get_vocab_size():
        return config_id
    return None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer: tokenizer.json, or a byte-level BPE from vocab.json + merges.txt."""
    from tokenizers import Tokenizer as Backend

    model_dir = Path(model_dir)
    tok_json = model_dir / "tokenizer.json"
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    tok_config = _json_or_empty(model_dir / "tokenizer_config.json")
    config = _json_or_empty(model_dir / "config.json")
    try:
        if tok_json.is_file():
            backend = Backend.from_file(str(tok_json))
        elif vocab.is_file() and merges.is_file():
            backend = _build_bpe(vocab, merges)
        else:
            raise CheckpointError(f"no tokenizer in {model_dir}: expected tokenizer.json, or vocab.json and merges.txt")
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"could not read the tokenizer in {model_dir}: {exc}") from None
    candidates = _eos_candidates(tok_config, config)
    eos_text = next((t for t in candidates if backend.token_to_id(t) is not None), None)
    if eos_text is not None and not tok_json.is_file():
        backend.add_special_tokens([eos_text])  # vocab.json lists it; this keeps it whole when encoding text
    eos = _special_id(backend, eos_text, config.get("eos_token_id"))
    if eos is None:
        raise CheckpointError(f"the tokenizer in {model_dir} has no end-of-text token "
                              f"(looked for {', '.join(candidates) or 'none named'}, and no "
                              "eos_token_id in config.json): is it this model's tokenizer?")
    pad = _special_id(backend, _token_text(tok_config.get("pad_token")), config.get("pad_token_id"))
    return Tokenizer(backend, eos, pad)
