"""GPT-2's byte-level BPE through the ``tokenizers`` library, read from the checkpoint's files."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

EOS_TEXT = "<|endoftext|>"


class Tokenizer:
    """Encode text to ids and back; ``eos_id`` is GPT-2's <|endoftext|>."""

    def __init__(self, backend) -> None:
        self.backend = backend
        eos = backend.token_to_id(EOS_TEXT)
        if eos is None:
            raise CheckpointError(f"tokenizer has no {EOS_TEXT} token; is this a GPT-2 tokenizer?")
        self.eos_id: int = eos

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


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load tokenizer.json, or build GPT-2's byte-level BPE from vocab.json + merges.txt."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors

    model_dir = Path(model_dir)
    tok_json = model_dir / "tokenizer.json"
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    try:
        if tok_json.is_file():
            return Tokenizer(Backend.from_file(str(tok_json)))
        if vocab.is_file() and merges.is_file():
            backend = Backend(models.BPE.from_file(str(vocab), str(merges)))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
            backend.add_special_tokens([EOS_TEXT])
            return Tokenizer(backend)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"could not read the tokenizer in {model_dir}: {exc}") from None
    raise CheckpointError(f"no tokenizer in {model_dir}: expected tokenizer.json, or vocab.json and merges.txt")
