"""An answer's text as its tokens arrive, decoded incrementally (as vLLM and transformers' TextStreamer do).

Decoding the whole answer again on every token costs its length per token, so the square of its length per
answer, on the event loop. Here a token decodes only a short window: the tokens since the text last advanced
(``prefix`` .. the end), against the same window without the tokens not yet read (``prefix`` .. ``read``); the
new text is the difference. The window starts where the text before it is complete (no split character), so
its decode from there is what the whole answer's decode gives from there: byte-level BPE (GPT-2, Llama 3, Qwen)
joins bytes, and SentencePiece's strip of one leading space (Llama 2) strips both decodes of the window alike.
A window whose decode ends with U+FFFD (a character split across tokens, its bytes still to come) is held until
the character is complete, so a stream never shows a replacement character that later becomes an emoji.

Stop strings are searched in the new text and the few characters before it (a stop string wholly in older text
would have ended the answer then), and the answer is cut where the first one begins, as a whole decode would
be. What a stream may send holds back an ending that could begin a stop string (:func:`.answers.held_back`),
so a stop string is never half streamed. When the engine ends the answer, its tokens are decoded whole once (a
cost of one answer's length), and whatever was held is resolved against that: streamed text and the
non-streamed answer are the same string.
"""

from __future__ import annotations

from collections.abc import Sequence

from .answers import held_back, stop_at


class AnswerText:
    """One answer's text: :meth:`add` each token, :meth:`take` what a stream may send, :meth:`finish` at the
    end; ``text`` is the answer so far (cut at a stop string), ``stopped`` whether a stop string ended it."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.stopped = False
        self.decoded = 0
        """Tokens decoded so far, windows and the final decode counted: the work, a few per token."""
        self._parts: list[str] = []  # the text, in the pieces it came in (joined when asked for)
        self._pending: list[str] = []  # its end, not yet taken by the stream
        self._tail = ""  # its last characters: enough for a stop string's beginning, or one that ends later
        self._keep = max((len(s) for s in self.stops), default=1)
        self._prefix = self._read = 0

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token: int) -> None:
        """Read one more token: its text joins the answer once its characters are complete; a stop string cuts
        the answer where it begins (and ``stopped`` is then True)."""
        if self.stopped:
            return
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or not after.startswith(before):
            return  # nothing new yet (or a decode that is not local: the final decode resolves it)
        new = after[len(before):]
        if not new.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.tokens)
            self._append(new)
        elif self.stops and stop_at(self._tail + new, self.stops) is not None:
            self._append(new)  # a stop string before the split character: the answer ends there all the same

    def finish(self) -> None:
        """The engine ended the answer (a stop token or its length): the text becomes its tokens' whole decode
        (cut at a stop string), held characters included."""
        if self.stopped:
            return
        full = self._decode(self.tokens)
        text = self.text
        if full.startswith(text):
            self._append(full[len(text):])
        else:  # a decode that is not local (transformers' clean-up of spaces): the whole decode wins from here
            sent = len(text) - sum(map(len, self._pending))
            self._parts, self._pending, self._tail = [full], [full[sent:]], full[-self._keep:]
        self._prefix = self._read = len(self.tokens)

    def take(self, final: bool = False) -> str:
        """The text not yet taken that a stream may send now: all of it when ``final``, else without an ending
        that could begin a stop string."""
        if not self._pending:
            return ""
        pending = "".join(self._pending)
        n = len(pending) - (0 if final else held_back(self._tail, self.stops))
        if n <= 0:
            self._pending = [pending]
            return ""
        self._pending = [pending[n:]] if n < len(pending) else []
        return pending[:n]

    def _decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids) if ids else ""

    def _append(self, new: str) -> None:
        if self.stops:
            window = self._tail + new
            hit = stop_at(window, self.stops)
            if hit is not None:  # cut from the stop string on: part of it may be in the held end of the text
                self.stopped = True
                drop = len(window) - hit
                cut_new = min(drop, len(new))
                new = new[:len(new) - cut_new]
                _trim(self._parts, drop - cut_new)
                _trim(self._pending, drop - cut_new)
                self._tail = self._tail[:len(self._tail) - (drop - cut_new)]
        if new:
            self._parts.append(new)
            self._pending.append(new)
            self._tail = (self._tail + new)[-self._keep:]


def _trim(parts: list[str], n: int) -> None:
    """Drop ``n`` characters from the end of the text ``parts`` holds in pieces."""
    while n > 0 and parts:
        last = parts.pop()
        if len(last) > n:
            parts.append(last[:len(last) - n])
            return
        n -= len(last)
