"""Chat prompts for generation: a conversation rendered with the template's generation prompt, and the
ids to stop at (the template's end-of-turn token and the model's EOS)."""

from __future__ import annotations

from typing import Any

from ..data.chat import end_of_turn_ids
from ..data.chat_template import ChatTemplate, resolve_chat_template


def chat_prompt(tokenizer, user: str, system: str | None = None, template: str | None = None, /,
                **variables: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, stop ids) for ``user``'s message after an optional ``system`` one.

    The ids equal ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``;
    ``template`` is a .jinja file or a named template (None: the model's own); ``variables``
    reach the template (e.g. ``enable_thinking=False`` for Qwen3; the names in
    RESERVED_TEMPLATE_VARIABLES are refused). A template that fails or crosses a render bound (time,
    size) is a DataError.
    """
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": user}]
    return messages_prompt(tokenizer, messages, template, **variables)


def messages_prompt(tokenizer, messages: list[dict[str, Any]], template: str | None = None, /,
                    **variables: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, stop ids) of a whole conversation (OpenAI-style ``messages``), ready for the
    assistant's next turn; see :func:`chat_prompt`."""
    text = resolve_chat_template(template, tokenizer.chat_template, tokenizer.source)
    rendered, _ = ChatTemplate(text, tokenizer.special_texts, **variables).render(messages, add_generation_prompt=True)
    stops = list(dict.fromkeys([*end_of_turn_ids(tokenizer, text, **variables), *tokenizer.eos_ids]))
    return tokenizer.encode(rendered), stops
