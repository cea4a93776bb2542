"""Continuous batching of requests for different adapters on one base model.

The engine keeps ``max_batch`` slots over one KV cache. Every :meth:`Engine.step`:

1. prefills what its :class:`~.scheduler.Scheduler` plans (the policy: first come first served, up to
   ``prefill_tokens`` prompt tokens per step, padding included): the prompts that fit are
   prefilled together in one forward (left-padded, each row with its own adapter), and their keys and values
   are copied into free slots, right-aligned so that they end where the running rows end (earlier positions
   of a slot are padding, masked). A prompt longer than the budget is prefilled in chunks over several steps
   (in a cache of its own), so a long prompt never stalls the running rows for longer than one budget;
2. decodes one token for every running row in one forward, each row applying its own adapter
   (:mod:`loratune.adapters.rows`) and its own sampling settings and seeded generator;
3. finishes the rows that hit a stop token or their length, freeing their slots at once.

The running rows always fill the first slots (a finished row's slot takes the last running row), so a
step computes only as many rows as are running, through views of the cache's first rows.

Rows of different lengths share the cache's time axis as a left-padded batch: the attention mask
hides each row's padding and rotary positions count each row's real tokens only (the models'
left-padding path), so a row computes what it would alone. Every row's tokens are contiguous and end at
the same column, so a key's distance in columns is its distance in positions for every row: a
sliding-window layer's window is the last ``window`` columns, and its cache keeps the whole time axis here
(not a ring buffer, which could not be shifted). When the time axis reaches the cache's end, every row is
shifted left by the padding all rows share (keys keep their rotary phase: it is applied before caching).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.rows import row_banks
from ..errors import ConfigError, ResourceError
from ..models.kv_cache import KVCache
from .decode_step import DecodeStep, static_step_applies
from .sampling import LogitsProcessing, SamplingConfig, next_token, token_logprobs
from .scheduler import Scheduler


class AdapterNotLoaded(ConfigError):
    """A request names an adapter the engine does not hold (it was unloaded after the request was checked)."""


@dataclass
class Request:
    """One completion: prompt token ids, the adapter (None: the bare base) and how to sample."""

    prompt: list[int]
    adapter: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_ids: Sequence[int] = ()
    processing: LogitsProcessing | None = None
    """logit_bias and penalties (None: the logits as the model gives them)."""
    logprobs: int | None = None
    """Report each token's logprob and this many most likely alternatives (None: no logprobs)."""
    id: int = field(default_factory=itertools.count().__next__)


Logprob = tuple[float, list[tuple[int, float]]]
"""A token's logprob and the top alternatives as (id, logprob): see :func:`token_logprobs`."""


@dataclass
class Finished:
    """A request's answer: the new tokens and why it ended (``stop``: a stop token, ``length``: max tokens,
    ``error``: its row failed)."""

    request: Request
    tokens: list[int]
    reason: str
    error: str | None = None
    """With reason ``error``: what failed (this request alone; the others go on)."""
    stop_token: int | None = None
    """With reason ``stop``: the stop id that ended it (not in ``tokens``; GRPO trains on it)."""


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Partial:
    """A prompt longer than one step's budget, prefilled chunk by chunk in a cache of its own (one slot is
    kept for it)."""

    request: Request
    cache: KVCache
    """Its keys and values so far: ``cache.length`` is how many prompt tokens are done."""


class Engine:
    """Continuous batching over ``max_batch`` slots of a model whose adapters are banked
    (:func:`~loratune.adapters.rows.build_banks`)."""

    def __init__(self, model: nn.Module, max_batch: int = 8, max_len: int | None = None,
                 prefill_tokens: int = 512, compile: bool = False) -> None:
        if max_batch < 1 or prefill_tokens < 1:
            raise ConfigError(f"max_batch (--max-batch) and prefill_tokens (--prefill-tokens) must be >= 1, got "
                              f"{max_batch} and {prefill_tokens}")
        self.model, self.max_batch = model.eval(), max_batch
        self.scheduler = Scheduler(prefill_tokens)
        self.max_len = min(max_len or model.config.context_length, model.config.context_length)
        switch = model.rope_switch_at()
        if switch is not None and self.max_len > switch:
            raise ConfigError(f"this model's rotary frequencies change once a sequence passes {switch} positions "
                              "(longrope or dynamic scaling), which rows of one batch cannot do apart: serve it "
                              f"with --max-model-len {switch} or less")
        self.device = next(model.parameters()).device
        self._check_memory()
        self.cache = self._new_cache(max_batch, self.max_len)
        self.mask = torch.zeros((max_batch, self.max_len), dtype=torch.long, device=self.device)
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.partial: _Partial | None = None
        self.adapters_changed()
        self.static = DecodeStep(model, self.max_len, compile) if static_step_applies(model) else None
        """A lone row without padding and adapters decodes through the static step (generate/decode_step.py)."""

    def _check_memory(self) -> None:
        """Refuse a cache the device cannot hold, with the estimate, before allocating it (--max-batch 10**9
        would otherwise ask for terabytes and die in the allocator)."""
        from ..runtime.device import available_memory

        one = self._new_cache(1, 1)  # per slot and position: every layer's keys and values, its token, the mask
        per = one.nbytes() + 2 * 8
        need = per * self.max_batch * self.max_len
        free = available_memory(self.device)
        if free is not None and need > free:
            raise ResourceError(f"the KV cache for --max-batch {self.max_batch} x {self.max_len} positions needs "
                                f"{need / 2**30:,.1f} GiB ({per:,} bytes per slot and position) but {self.device} has "
                                f"{free / 2**30:,.1f} GiB free: lower --max-batch or --max-model-len")

    def _new_cache(self, batch: int, length: int) -> KVCache:
        """A cache whose sliding-window layers keep every position too (the engine shifts caches in time)."""
        return self.model.new_cache(batch, length, rings=False)

    def adapters_changed(self) -> None:
        """Call after adapters were loaded or removed (their slots written or emptied in the model's banks)."""
        self.banks = row_banks(self.model)  # held beside the model, not in its layers (adapters/rows.py)
        self.banked: set[str] = set(self.banks.names) if self.banks is not None else set()

    def adapters_in_use(self) -> set[str]:
        requests = [r.request for r in self.rows if r is not None] + list(self.waiting)
        if self.partial is not None:
            requests.append(self.partial.request)
        return {r.adapter for r in requests if r.adapter}

    def _applying(self, adapters: list[str | None]):
        """Each row's adapter for the forwards inside (a model without adapters serves the base only)."""
        if not self.banked:  # check() let no adapter in
            return contextlib.nullcontext()
        return self.banks.applying(adapters)

    # ------------------------------------------------------------------ requests in and out
    def check(self, request: Request) -> None:
        """Refuse (ConfigError) a request whose prompt and tokens cannot fit the context."""
        n, new = len(request.prompt), request.sampling.max_new_tokens
        if request.adapter is not None and request.adapter not in self.banked:
            raise AdapterNotLoaded(f"adapter {request.adapter!r} is not loaded (loaded: "
                              f"{', '.join(sorted(self.banked)) or 'none'})")
        if n == 0:
            raise ConfigError("the prompt is empty")
        if n + new > self.max_len:
            raise ConfigError(f"prompt of {n} tokens + max_tokens {new} exceeds the context of {self.max_len}")

    def submit(self, request: Request) -> None:
        """Queue ``request`` (see :meth:`check`)."""
        self.check(request)
        self.waiting.append(request)

    def busy(self) -> bool:
        return bool(self.waiting) or self.partial is not None or any(r is not None for r in self.rows)

    def cancel(self, request_id: int) -> bool:
        """Drop a waiting, prefilling or running request (a client went away); returns whether it was found."""
        for i, row in enumerate(self.rows):
            if row is not None and row.request.id == request_id:
                self._free(i)
                return True
        if self.partial is not None and self.partial.request.id == request_id:
            self.partial = None
            return True
        for r in list(self.waiting):
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        return False

    def clear(self) -> None:
        """Forget every request (after a failure that left the engine's state unknown)."""
        self.rows = [None] * self.max_batch
        self.waiting.clear()
        self.partial = None
        self.cache.reset()
        self.mask.zero_()

    def free_slots(self) -> int:
        return sum(r is None for r in self.rows) - (self.partial is not None)

    def running(self) -> int:
        """Rows being decoded: they fill slots 0 .. running - 1."""
        return next((i for i, r in enumerate(self.rows) if r is None), self.max_batch)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> tuple[list[tuple[Request, int, Logprob | None]], list[Finished]]:
        """Prefill waiting requests (within the step's prompt-token budget), then decode one token for every
        running row.

        Returns the tokens produced this step, as (request, token, its logprobs or None), and the requests that
        finished."""
        produced: list[tuple[Request, int, Logprob | None]] = []
        finished: list[Finished] = []
        if self.running() == 0 and self.partial is None:  # idle: the time axis starts over
            self.cache.reset()
            self.mask.zero_()
        part = self.partial
        plan = self.scheduler.plan((len(r.prompt) for r in self.waiting), self.free_slots(),
                                   None if part is None else len(part.request.prompt) - part.cache.length)
        if plan.chunk:
            self._continue_partial(plan.chunk, produced, finished)
        for group in plan.groups:
            self._prefill([self.waiting.popleft() for _ in range(group.count)], produced, finished)
        if plan.new_chunk:  # longer than a whole budget: prefilled in chunks, in a cache of its own
            request = self.waiting.popleft()
            self.partial = _Partial(request, self._new_cache(1, len(request.prompt)))
            self._continue_partial(plan.new_chunk, produced, finished)
        n = self.running()  # a newcomer decodes its second token now
        if n:
            self._decode(n, produced, finished)
        return produced, finished

    def _prefill(self, group: list[Request], produced: list, finished: list) -> None:
        """Prefill ``group`` in one forward (left-padded when the lengths differ) and start their rows."""
        longest = max(len(r.prompt) for r in group)
        ids = torch.zeros((len(group), longest), dtype=torch.long, device=self.device)
        pad = torch.zeros_like(ids)
        for i, r in enumerate(group):
            ids[i, longest - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            pad[i, longest - len(r.prompt):] = 1
        uneven = any(len(r.prompt) != longest for r in group)
        try:
            cache = self._new_cache(len(group), longest)
            with self._applying([r.adapter for r in group]):
                hidden = self.model.hidden_states(ids, cache, attention_mask=pad if uneven else None)
                logits = self.model.logits(hidden[:, -1])  # (rows, V)
        except RuntimeError as exc:  # out of memory, say: these requests fail, the running rows go on
            finished.extend(Finished(r, [], "error", f"prefill failed: {type(exc).__name__}: {exc}") for r in group)
            return
        for i, r in enumerate(group):
            self._start(r, cache, i, longest - len(r.prompt), logits[i:i + 1], produced, finished)

    def _continue_partial(self, budget: int, produced: list, finished: list) -> int:
        """Prefill the next chunk (at most ``budget`` tokens) of the long prompt; start its row when it is
        done. Returns the tokens prefilled."""
        part = self.partial
        done = part.cache.length
        chunk = part.request.prompt[done:done + budget]
        last = done + len(chunk) == len(part.request.prompt)
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        with self._applying([part.request.adapter]):
            hidden = self.model.hidden_states(ids, part.cache)
            logits = self.model.logits(hidden[:, -1]) if last else None
        if last:
            self.partial = None
            self._start(part.request, part.cache, 0, 0, logits, produced, finished)
        return len(chunk)

    def _start(self, request: Request, source: KVCache, row: int, first: int, logits: torch.Tensor,
               produced: list, finished: list) -> None:
        """Copy a prefilled prompt (``source``'s ``row``, positions ``first``..) into the first free slot,
        right-aligned on the time axis, and emit its first token."""
        n, slot, t = len(request.prompt), self.running(), self.cache.length
        if t < n:  # the running rows move right to make room for the newcomer's prompt
            self._shift(n - t)
            t = n
        self.cache.copy_row(slot, source, row, first, n, at=t - n)
        self.mask[slot] = 0
        self.mask[slot, t - n:t] = 1
        cfg = request.sampling
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.rows[slot] = _Row(request, generator)
        self._emit(slot, self._sample(logits, self.rows[slot]), produced, finished)

    def _decode(self, n: int, produced: list, finished: list) -> None:
        if self.cache.length + 1 > self.max_len:
            self._compact()
        t = self.cache.length
        last = torch.tensor([[self.rows[i].tokens[-1]] for i in range(n)], dtype=torch.long, device=self.device)
        self.mask[:, t] = 0
        self.mask[:n, t] = 1
        view = self.cache.first_rows(n)  # views: the forward's writes land in the cache
        if self.static is not None and n == 1 and not self.banked and bool(self.mask[0, :t].all()):
            logits = self.static(last, view)  # (1, V)
        else:
            with self._applying([self.rows[i].request.adapter for i in range(n)]):
                hidden = self.model.hidden_states(last, view, attention_mask=self.mask[:n, :t + 1])
                logits = self.model.logits(hidden[:, -1])  # (n, V)
        self.cache.length = view.length
        tokens = [self._sample(logits[i:i + 1], self.rows[i]) for i in range(n)]
        for i in reversed(range(n)):  # a freed slot takes the last running row, which is already handled
            self._emit(i, tokens[i], produced, finished)

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> tuple[int, Logprob | None] | str:
        """The row's next token and its logprobs (as asked), or what went wrong: any failure here (non-finite
        logits, a setting that slipped past the checks) ends that row alone, never the step."""
        request = row.request
        try:
            if request.processing is not None and request.processing.active():
                logits = request.processing.apply(logits, row.tokens)
            token = int(next_token(logits, request.sampling, row.generator)[0])
            return token, (None if request.logprobs is None else token_logprobs(logits, token, request.logprobs))
        except Exception as exc:  # NonFiniteOutput, RuntimeError, a TypeError from a bad setting: this row's
            return f"sampling failed: {exc}"

    def _emit(self, slot: int, sampled: tuple[int, Logprob | None] | str, produced: list, finished: list) -> None:
        row = self.rows[slot]
        if isinstance(sampled, str):
            finished.append(Finished(row.request, row.tokens, "error", sampled))
            self._free(slot)
            return
        token, logprob = sampled
        cfg, stops = row.request.sampling, row.request.stop_ids
        if cfg.stop_at_eos and token in stops:
            finished.append(Finished(row.request, row.tokens, "stop", stop_token=token))
            self._free(slot)
            return
        row.tokens.append(token)
        produced.append((row.request, token, logprob))
        if len(row.tokens) >= cfg.max_new_tokens:
            finished.append(Finished(row.request, row.tokens, "length"))
            self._free(slot)

    def _free(self, slot: int) -> None:
        """End the row in ``slot``; the last running row moves into it, so running rows stay first."""
        last = self.running() - 1
        if slot != last:
            self.cache.move_row(last, slot)
            self.mask[slot] = self.mask[last]
            self.rows[slot] = self.rows[last]
        self.rows[last] = None
        self.mask[last] = 0

    # ------------------------------------------------------------------ the time axis
    def _shift(self, by: int) -> None:
        """Move the running rows' keys, values and mask ``by`` positions (right if > 0, left if < 0). Only the
        positions in use move (a whole-cache copy would cost gigabytes at a large --max-batch)."""
        t = self.cache.length
        src = slice(max(0, -by), t)
        dst = slice(max(0, by), t + by)
        self.cache.shift(by, rows=self.running())
        mask = self.mask[:, src].clone()
        self.mask.zero_()
        self.mask[:, dst] = mask

    def _compact(self) -> None:
        """Drop the padding every row has on its left, so the time axis has room again."""
        t = self.cache.length
        real = self.mask[:, :t].bool()
        starts = [int(real[i].nonzero()[0, 0]) for i in range(self.max_batch) if bool(real[i].any())]
        shift = min(starts) if starts else t
        if shift == 0:
            raise RuntimeError("the KV cache is full and no row has padding to drop")  # prevented by submit()
        self._shift(-shift)
