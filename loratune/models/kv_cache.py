"""A preallocated key/value cache for incremental decoding (no concatenation per decoding step).

Layers that attend to every earlier position keep ``max_len`` slots. Sliding-window layers
(Mistral, Gemma 3's local layers) keep only ``window`` slots as a ring buffer: position i lives
in slot i % window, and each slot remembers which sequence index it holds, so the attention mask
is built from indices (see ``models/decoder.py``). A long generation thus costs a Gemma 3 local
layer 512 slots, not the whole sequence.
"""

from __future__ import annotations

import copy

import torch


class KVCache:
    """Keys and values of past positions for every layer, preallocated."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_size: int,
                 dtype: torch.dtype, device: torch.device, windows: list[int | None] | None = None) -> None:
        windows = windows or [None] * n_layer
        self.sizes = [max_len if w is None or w >= max_len else w for w in windows]
        self.ring = [w is not None and w < max_len for w in windows]
        self.k = [torch.zeros((batch, n_kv_head, s, head_size), dtype=dtype, device=device) for s in self.sizes]
        self.v = [torch.zeros((batch, n_kv_head, s, head_size), dtype=dtype, device=device) for s in self.sizes]
        self.slot_index = {s: torch.full((s,), -1, dtype=torch.long, device=device)
                           for s, r in zip(self.sizes, self.ring) if r}  # ring size -> sequence index per slot
        self.tokens = torch.zeros((batch, max_len), dtype=torch.long, device=device)  # the ids so far
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys/values; return the keys/values the layer attends over.

        Full layers: all positions so far, (B, nh, L + T, hs). Ring layers: one new token is written
        first and all slots returned (the one it replaces is outside every window); a chunk of
        several is attended as old slots + the chunk (:meth:`key_index` orders keys the same way),
        and then its last tokens are written.
        """
        T, start = k.shape[2], self.length
        if not self.ring[layer]:
            end = start + T
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        size = self.sizes[layer]
        if T == 1:
            self.k[layer][:, :, start % size] = k[:, :, 0]
            self.v[layer][:, :, start % size] = v[:, :, 0]
            return self.k[layer], self.v[layer]
        keys, values = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        keep = min(T, size)
        slots = torch.arange(start + T - keep, start + T, device=k.device) % size
        self.k[layer][:, :, slots] = k[:, :, T - keep:]
        self.v[layer][:, :, slots] = v[:, :, T - keep:]
        return keys, values

    def key_index(self, window: int | None, T: int, device: torch.device) -> torch.Tensor:
        """(L,) sequence index of each key a layer with ``window`` sees in this step's :meth:`update`; -1 = empty."""
        start = self.length
        size = self.max_len if window is None or window >= self.max_len else window
        if size not in self.slot_index:
            return torch.arange(start + T, device=device)
        if T == 1:
            index = self.slot_index[size].clone()
            index[start % size] = start
            return index
        return torch.cat([self.slot_index[size], torch.arange(start, start + T, device=device)])

    def reset(self) -> None:
        """Forget every stored position (the buffers are reused)."""
        for index in self.slot_index.values():
            index.fill_(-1)
        self.length = 0

    def advance(self, T: int) -> None:
        """Record that every layer stored ``T`` more positions."""
        for size, index in self.slot_index.items():
            keep = min(T, size)
            new = torch.arange(self.length + T - keep, self.length + T, device=index.device)
            index[new % size] = new
        self.length += T

    # ------------------------------------------------------------------ rows and positions (the server's engine)
    # The engine keeps many sequences in one cache as a left-padded batch and moves them about: these methods
    # are those moves, so that no caller reaches into the layers' tensors. They need every layer to keep every
    # position (a cache made with ``rings=False``): a ring buffer's slots cannot be moved in time.

    def nbytes(self) -> int:
        """Bytes of every layer's keys and values (what the cache takes on its device, its token ids aside)."""
        return sum(t.numel() * t.element_size() for t in [*self.k, *self.v])

    def first_rows(self, n: int) -> KVCache:
        """This cache's rows 0 .. n-1 as a cache of their own whose tensors are views of this one's (a forward
        through it writes here). Its ``length`` moves on its own: copy it back after the forward."""
        view = copy.copy(self)
        view.k, view.v = [k[:n] for k in self.k], [v[:n] for v in self.v]
        view.tokens = self.tokens[:n]
        return view

    def copy_row(self, row: int, source: KVCache, source_row: int, start: int, n: int, at: int) -> None:
        """Write ``n`` positions of ``source``'s row ``source_row``, from position ``start``, into this cache's
        row ``row`` at positions ``at`` .. at + n (a prompt prefilled elsewhere, moved into its slot)."""
        self._check_linear()
        for store, other in ((self.k, source.k), (self.v, source.v)):
            for layer, theirs in zip(store, other):
                layer[row, :, at:at + n] = theirs[source_row, :, start:start + n]
        self.tokens[row, at:at + n] = source.tokens[source_row, start:start + n]

    def move_row(self, source_row: int, row: int) -> None:
        """Copy row ``source_row``'s positions in use (0 .. length) into row ``row`` (only those: a whole-row
        copy would cost every position of every layer)."""
        self._check_linear()
        t = self.length
        for store in (self.k, self.v):
            for layer in store:
                layer[row, :, :t] = layer[source_row, :, :t]
        self.tokens[row, :t] = self.tokens[source_row, :t]

    def shift(self, by: int, rows: int) -> None:
        """Move the positions in use of rows 0 .. rows-1 ``by`` positions (right if > 0, left if < 0: the first
        -by positions are dropped) and the length with them. Keys keep their rotary phase (it is applied before
        they are cached)."""
        self._check_linear()
        t = self.length
        keep = t - max(0, -by)  # positions that survive a left shift
        src = slice(max(0, -by), t)
        dst = slice(max(0, by), max(0, by) + keep)
        for store in (self.k, self.v):
            for layer in store:
                layer[:rows, :, dst] = layer[:rows, :, src].clone()
        self.tokens[:rows, dst] = self.tokens[:rows, src].clone()
        self.length = t + by

    def _check_linear(self) -> None:
        if any(self.ring):
            raise ValueError("rows of a cache with ring-buffer layers cannot be moved in time: make it with "
                             "rings=False")


def cache_dtype(weight: torch.Tensor) -> torch.dtype:
    """The cache's dtype for a model whose weights look like ``weight``.

    On CPU a bf16 model keeps its keys and values in float32: CPU attention over one query runs
    several times faster in float32 than in bf16 (and rounds less); elsewhere the cache takes the weights' dtype.
    """
    return torch.float32 if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 else weight.dtype
