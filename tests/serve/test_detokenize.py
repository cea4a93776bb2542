"""loratune/serve/detokenize.py: an answer decoded a few tokens at a time streams exactly the text of its whole
decode, with real tokenizers (byte-level BPE: Llama 3, Qwen3; SentencePiece with byte fallback: Llama 2, Gemma 3)
and characters split across tokens (emoji, CJK); stop strings cut it where a whole decode would and are never
half streamed; the work is linear in the answer's length."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loratune.serve.answers import stop_at
from loratune.serve.detokenize import AnswerText

TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"
NAMES = ["llama3_1", "qwen3", "llama2", "gemma3"]
TEXT = ("Grüße 👋🏽 from Zürich! 猫が好きです。 A family: 👩‍👩‍👧‍👦, a flag 🇫🇷, math ∑∫≈ and a "
        "smile 😀😀 — done. ¿Qué tal? Ελληνικά και 한국어 텍스트 ✅🚀 and rarer ones: 𓀀 🫎 ꙮ 𝔘𝔫𝔦")


@pytest.fixture(scope="module", params=NAMES)
def tokenizer(request):
    path = TOKENIZERS / request.param
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no shared tokenizer at {path}")
    from loratune.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def stream(tokenizer, tokens: list[int], stops=()) -> tuple[list[str], AnswerText]:
    """The pieces a stream sends, token by token, then at the end (unless a stop string ended it first)."""
    text, pieces = AnswerText(tokenizer, stops), []
    for token in tokens:
        text.add(token)
        pieces.append(text.take(final=text.stopped))
        if text.stopped:
            return pieces, text
    text.finish()
    pieces.append(text.take(final=True))
    return pieces, text


def test_streamed_text_is_the_whole_decode_with_split_characters(tokenizer):
    tokens = tokenizer.encode(TEXT)
    split = [t for t in tokens if "\ufffd" in tokenizer.decode([t])]
    assert split, "the text should hold characters split across tokens"
    pieces, text = stream(tokenizer, tokens)
    assert "".join(pieces) == text.text == tokenizer.decode(tokens)
    assert not any("\ufffd" in p for p in pieces)  # a split character is held until it is whole


@pytest.mark.parametrize("seed", range(3))
def test_random_tokens_stream_their_whole_decode(tokenizer, seed):
    """Any ids (bytes that never make a character, special tokens): still the whole decode, exactly."""
    rng = random.Random(seed)
    tokens = [rng.randrange(tokenizer.vocab_size) for _ in range(300)]
    pieces, text = stream(tokenizer, tokens)
    assert "".join(pieces) == text.text == tokenizer.decode(tokens)


def reference(tokenizer, tokens: list[int], stops: list[str]) -> tuple[str, int]:
    """What the server did before: the whole text decoded at every token, cut at the first stop string."""
    for k in range(1, len(tokens) + 1):
        full = tokenizer.decode(tokens[:k])
        hit = stop_at(full, stops)
        if hit is not None:
            return full[:hit], k
    return tokenizer.decode(tokens), len(tokens)


@pytest.mark.parametrize("stops", [["🇫🇷"], ["好き", "never there"], ["Zürich!"], ["😀 —"], ["∫≈", "a f"],
                                   ["no such text"]], ids=repr)
def test_stop_strings_cut_where_the_whole_decode_would_and_are_never_half_streamed(tokenizer, stops):
    tokens = tokenizer.encode(TEXT)
    want, consumed = reference(tokenizer, tokens, stops)
    pieces, text = stream(tokenizer, tokens, stops)
    assert "".join(pieces) == text.text == want
    assert len(text.tokens) == consumed and text.stopped == (consumed < len(tokens) or stop_at(TEXT, stops) is not None)
    sent = ""
    for piece in pieces:  # whatever was sent stays part of the answer: no stop string's beginning went out
        sent += piece
        assert want.startswith(sent)


def test_the_work_is_linear_in_the_answers_length(tokenizer):
    """A few tokens decoded per token (a window and its context), and the whole answer once at the end; decoding
    the whole text at every token would be n (n + 1) / 2."""
    tokens = tokenizer.encode(TEXT * 20)
    n = len(tokens)
    pieces, text = stream(tokenizer, tokens)
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert text.decoded <= 5 * n + n < n * (n + 1) // 2 // 50
