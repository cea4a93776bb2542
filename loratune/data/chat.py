"""Conversations -> training examples: rendered by the chat template, loss on the assistant turns.

Which tokens train comes from the rendered text itself. Where the template marks the
assistant's text with ``{% generation %}``, those spans train. Otherwise each assistant
message's content is found in the rendered text (after the template's assistant header, in
message order), and its span is extended through the first special token that follows it: the
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``), so that the
model learns to stop. A template that puts no special token after an assistant turn is refused:
a model tuned on it would never stop. Tokens map to characters through the tokenizer's offsets.

A conversation longer than seq_len + 1 tokens loses whole trailing exchanges first (it is
re-rendered up to an earlier assistant turn). A first exchange that alone is too long is cut
inside: its user message loses its end (a long post keeps its instruction and beginning, and the
answer stays whole); only where the answer alone does not fit are the tokens cut at seq_len + 1.
What was cut is reported with each example (:class:`Encoded`).
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .chat_template import ChatTemplate
from .template_bounds import TemplateBound
from .config import DataConfig
from .examples import IGNORE_INDEX, Encoded, Example
from .tokenizer import Tokenizer


class ChatEncoder:
    """Turns conversations into :class:`Example` s with assistant-only (or last-turn, or all) labels."""

    def __init__(self, tokenizer: Tokenizer, template: str, cfg: DataConfig, seq_len: int) -> None:
        self.tokenizer, self.train_on, self.limit = tokenizer, cfg.train_on, seq_len + 1
        self.template = ChatTemplate(template, tokenizer.special_texts, **cfg.template_kwargs)
        self.special = tokenizer.special_ids
        probe = [{"role": "user", "content": "x"}]
        try:
            with_prompt, _ = self.template.render(probe, add_generation_prompt=True)
            without, _ = self.template.render(probe)
        except TemplateBound:  # too slow or too big on a one-line probe: so it is on every record
            raise
        except DataError:  # a template that refuses this probe: its error comes with the first real record
            with_prompt = without = ""
        self.header = with_prompt[len(without):] if with_prompt.startswith(without) else ""
        """The assistant's header (the generation prompt), found before each assistant turn."""

    def encode(self, messages: list[dict[str, Any]]) -> Encoded:
        """The example of one conversation, cut to seq_len + 1 tokens by whole exchanges where possible."""
        if self.train_on != "all" and not any(m["role"] == "assistant" for m in messages):
            return Encoded(None, dropped="no assistant message")
        ids, labels = self._labelled(messages)
        cut, inside = None, False
        if len(ids) > self.limit:
            ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"][::-1]
            for end in ends[1:] if ends and ends[0] == len(messages) else ends:
                ids, labels = self._labelled(messages[:end])
                if len(ids) <= self.limit:
                    cut = f"cut the last {len(messages) - end} of {len(messages)} messages to fit {self.limit} tokens"
                    break
            else:
                first = ends[-1] if ends else len(messages)
                after = f"; dropped the {len(messages) - first} messages after it" if first < len(messages) else ""
                (ids, labels), what = self._cut_first_exchange(messages[:first])
                cut, inside = what + after, True
        if not ids:
            return Encoded(None, dropped="the template rendered no text")
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
        if all(lab == IGNORE_INDEX for lab in labels):
            why = "no assistant token left after the cut to seq_len" if cut else "no token to train"
            return Encoded(None, cut=cut, cut_inside=inside, dropped=why)
        return Encoded(Example(ids, labels), cut=cut, cut_inside=inside)

    def _cut_first_exchange(self, messages: list[dict[str, Any]]) -> tuple[tuple[list[int], list[int]], str]:
        """An exchange too long alone: its last user message loses its end (the longest start that fits,
        by bisection over its tokens); if even an empty one does not fit, the tokens are cut at the limit."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if users and self.train_on != "all":
            u = users[-1]
            words = self.tokenizer.encode(messages[u]["content"])

            def shortened(k: int) -> tuple[list[int], list[int]]:
                text = self.tokenizer.decode(words[:k])
                return self._labelled([*messages[:u], {**messages[u], "content": text}, *messages[u + 1:]])

            lo, hi = 0, len(words)  # shortened(lo) fits, shortened(hi + 1) does not
            if len(shortened(0)[0]) <= self.limit:
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if len(shortened(mid)[0]) <= self.limit else (lo, mid - 1)
                return shortened(lo), (f"cut user message {u} to its first {lo} of {len(words)} tokens to fit "
                                       f"{self.limit} tokens")
        ids, labels = self._labelled(messages)
        return (ids[:self.limit], labels[:self.limit]), f"cut the first exchange at {self.limit} of {len(ids)} tokens"

    def _labelled(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        text, marked = self.template.render(messages)
        ids, offsets = self.tokenizer.encode_offsets(text)
        if self.train_on == "all":
            return ids, list(ids)
        if marked:  # the template's {% generation %} spans, as they are
            spans = [(a, b, b) for a, b in marked]
        else:
            spans = self._assistant_spans(text, messages)
        if self.train_on == "last_assistant":
            spans = spans[-1:]
        trained = [False] * len(ids)
        for start, end, limit in spans:
            if not marked:
                end = self._end_of_turn(ids, offsets, end, limit, text)
            for t, (a, b) in enumerate(offsets):
                if a < end and b > start:
                    trained[t] = True
        return ids, [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained)]

    def _assistant_spans(self, text: str, messages: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
        """(start, end, limit) characters of each assistant content; ``limit``: where the next message's
        content starts (the end-of-turn must come before it)."""
        found, cursor = [], 0
        for i, message in enumerate(messages):
            content = message["content"]
            start = cursor
            if message["role"] == "assistant" and self.header:
                at = text.find(self.header, cursor)
                start = at + len(self.header) if at >= 0 else cursor
            at, length = _find(text, content, start)
            if at < 0:
                if message["role"] == "assistant":
                    raise DataError(f"the chat template does not write assistant message {i}'s content as it is, "
                                    "so loratune cannot tell which tokens to train: use a template that does, or "
                                    "one with {% generation %} markers (data.chat_template)")
                continue
            found.append((message["role"], at, at + length))
            cursor = at + length
        spans = []
        for k, (role, start, end) in enumerate(found):
            if role == "assistant":
                spans.append((start, end, found[k + 1][1] if k + 1 < len(found) else len(text)))
        return spans

    def _end_of_turn(self, ids: list[int], offsets: list[tuple[int, int]], end: int, limit: int, text: str) -> int:
        """The character end of the first special token after ``end`` and before ``limit``."""
        for tok, (a, b) in zip(ids, offsets):
            if a >= end and b <= limit and tok in self.special:
                return b
            if a >= limit:
                break
        raise DataError(f"the chat template ends an assistant turn with no special token (after the content "
                        f"comes {text[end:end + 40]!r}): a model tuned on it would never learn to stop. Use a "
                        "template that ends turns with an end-of-turn or EOS token (data.chat_template)")


def _find(text: str, content: str, start: int) -> tuple[int, int]:
    """Where ``content`` (or its stripped text, as templates that trim write it) is, from ``start``."""
    at = text.find(content, start)
    if at >= 0:
        return at, len(content)
    stripped = content.strip()
    return text.find(stripped, start), len(stripped)


def end_of_turn_ids(tokenizer: Tokenizer, template: str, /, **template_kwargs: Any) -> list[int]:
    """The special token(s) the template ends an assistant turn with (``<|im_end|>``, ``<|eot_id|>`` ...):
    what generation stops on besides EOS, found as training finds them."""
    cfg = DataConfig(task="chat", template_kwargs=template_kwargs)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    example = ChatEncoder(tokenizer, template, cfg, seq_len=4096).encode(probe).example
    special = tokenizer.special_ids
    return [t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX and t in special]
