"""What the engine's next step prefills: the scheduling policy, apart from the forwards that carry it out.

The policy, as :class:`~.engine.Engine` has always served it:

- **Running rows never wait.** Every step decodes one token for every running row; prefilling new prompts
  shares the step with them, so a step's prompt tokens are bounded by ``prefill_tokens`` (``--prefill-tokens``)
  and a running row waits at most one budget's forward for its next token.
- **First come, first served.** Waiting requests are admitted in order into free slots; the queue stops at the
  first prompt that does not fit what is left of the budget (a later, shorter one never overtakes it).
- **Prompts that fit are prefilled together**, in one left-padded forward: a group costs
  ``len(group) * longest prompt``, padding included, and that is what counts against the budget.
- **A prompt longer than the whole budget is prefilled in chunks**, one at a time, over several steps (a slot
  is kept for it); each step gives it what is left of the budget first, then admits whole prompts with the rest.

:class:`Scheduler` decides from plain numbers (the queue's prompt lengths, free slots, the chunked prompt's
remaining tokens), so the policy is tested without a model (tests/serve/test_scheduler.py); the engine turns a
:class:`StepPlan` into forwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Group:
    """Whole prompts prefilled in one forward: the next ``count`` requests of the queue."""

    count: int
    tokens: int
    """What the forward computes: ``count`` x the longest prompt (the shorter ones are left-padded)."""


@dataclass(frozen=True)
class StepPlan:
    """What one step prefills, in this order, before it decodes every running row."""

    chunk: int = 0
    """Tokens of the prompt already being prefilled in chunks (0: none, or none left)."""
    groups: tuple[Group, ...] = ()
    """Forwards of whole prompts from the queue's head, in queue order."""
    new_chunk: int = 0
    """> 0: the queue's next request (after the groups) is longer than a whole budget; it starts chunked
    prefill with a first chunk of this many tokens."""

    @property
    def tokens(self) -> int:
        """Prompt tokens this step computes, padding included (never more than the budget)."""
        return self.chunk + sum(g.tokens for g in self.groups) + self.new_chunk

    @property
    def admitted(self) -> int:
        """Requests taken off the queue this step (the one starting chunked prefill included)."""
        return sum(g.count for g in self.groups) + (self.new_chunk > 0)


@dataclass(frozen=True)
class Scheduler:
    """The prefill policy of the module docstring, for a budget of ``prefill_tokens`` prompt tokens per step."""

    prefill_tokens: int = 512
    """Prompt tokens (padding included) one step may prefill beside its decoding (--prefill-tokens)."""

    def __post_init__(self) -> None:
        if self.prefill_tokens < 1:
            raise ConfigError(f"prefill_tokens (--prefill-tokens) must be >= 1, got {self.prefill_tokens}")

    def plan(self, waiting: Iterable[int], free_slots: int, chunked_left: int | None = None) -> StepPlan:
        """The next step's prefills.

        ``waiting``: the queue's prompt lengths, first come first (read lazily, only as far as the step
        admits); ``free_slots``: slots neither running nor kept for the chunked prompt; ``chunked_left``: the
        prompt tokens not yet prefilled of the request being prefilled in chunks (None: there is none)."""
        budget, chunk = self.prefill_tokens, 0
        if chunked_left is not None:
            chunk = min(budget, chunked_left)
            budget -= chunk
            if chunk < chunked_left:  # still unfinished: it keeps its slot and took the whole budget
                return StepPlan(chunk=chunk)
        groups: list[Group] = []
        count = longest = 0
        queue = iter(waiting)
        head = next(queue, None)
        while head is not None and budget > 0 and free_slots > 0:
            cost = (count + 1) * max(longest, head)  # the group with ``head`` in it, padding included
            if count == free_slots or cost > budget:
                if count:  # close this group; the rest of the budget may take another
                    groups.append(Group(count, count * longest))
                    budget -= count * longest
                    free_slots -= count
                    count = longest = 0
                    continue
                if head > self.prefill_tokens:  # longer than a whole budget: in chunks, from what is left
                    return StepPlan(chunk, tuple(groups), min(budget, head))
                break  # it fits a whole budget: it waits for the next step, and everything behind it too
            count, longest = count + 1, max(longest, head)
            head = next(queue, None)
        if count:
            groups.append(Group(count, count * longest))
        return StepPlan(chunk, tuple(groups))
