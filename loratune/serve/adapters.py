"""The adapters a server holds: loaded by name, banked for per-row use, evicted least recently used.

Adapters named at start-up (``--adapter NAME=DIR``) come from wherever the operator says. Adapters
loaded while serving (``/v1/load_lora_adapter``) come only from inside ``--adapter-dir``: a path
that leaves it (``..``, an absolute path elsewhere, a symlink out of it, or a file inside that links
out) is refused. Loading reads safetensors only (see adapters/peft_format.py: a pickled
``adapter_model.bin`` is read with ``weights_only``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ..adapters.named import delete_adapter
from ..adapters.peft_format import WEIGHTS_NAME, AdapterFiles, attach_adapter, read_adapter
from ..adapters.rows import RowBanks
from ..errors import ConfigError


NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Adapter names: they become module keys (no dots) and API model ids."""


class AdapterRegistry:
    def __init__(self, model: nn.Module, base_model: str, adapter_dir: str | Path | None, max_adapters: int) -> None:
        if max_adapters < 1:
            raise ConfigError(f"max_adapters must be >= 1, got {max_adapters}")
        self.model, self.base_model, self.max_adapters = model, base_model, max_adapters
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        if self.adapter_dir is not None and not self.adapter_dir.is_dir():
            raise ConfigError(f"--adapter-dir {adapter_dir} is not a directory: create it, or give the directory "
                              "that holds the adapters to load at run time")
        self.loaded: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self.draining: set[str] = set()  # being unloaded: no new requests, removed once their requests finish
        self.banks = RowBanks(model, max_adapters)
        """Every adapted layer's bank of the loaded adapters: a load writes one slot, an unload empties one."""

    def names(self) -> list[str]:
        return list(self.loaded)

    def serving(self) -> dict[str, Path]:
        """The adapters new requests may name (loaded and not being unloaded), with their directories. Read as
        a snapshot: the engine's thread may load or remove adapters meanwhile."""
        return {n: p for n, p in list(self.loaded.items()) if n not in self.draining}

    def touch(self, name: str) -> None:
        """Mark ``name`` as just used (nothing if it was unloaded meanwhile)."""
        if name in self.loaded:
            self.loaded.move_to_end(name)

    def inside_adapter_dir(self, path: str) -> Path:
        """``path`` (relative to --adapter-dir, or absolute) if it and every file in it stay inside the directory."""
        if self.adapter_dir is None:
            raise ConfigError("loading adapters at run time needs --adapter-dir (the only place they may come from)")
        raw = Path(path)
        if ".." in raw.parts:
            raise ConfigError(f"adapter path {path!r} contains '..': give a directory inside --adapter-dir")
        resolved = (raw if raw.is_absolute() else self.adapter_dir / raw).resolve()
        if not resolved.is_relative_to(self.adapter_dir):
            raise ConfigError(f"adapter path {path!r} is outside --adapter-dir {self.adapter_dir}")
        if not resolved.is_dir():
            raise ConfigError(f"adapter path {path!r} is not a directory inside --adapter-dir")
        for f in resolved.rglob("*"):
            if not f.resolve().is_relative_to(self.adapter_dir):
                raise ConfigError(f"adapter path {path!r} holds {f.name}, which links outside --adapter-dir")
        return resolved

    def load(self, name: str, path: str | Path, busy: set[str], trusted: bool = False) -> list[str]:
        """Load adapter ``name`` (from --adapter-dir unless ``trusted``), evicting the least recently used one
        not in ``busy`` when --max-adapters is reached; returns the names evicted."""
        return self.attach(name, self.read(name, path, trusted), busy)

    def read(self, name: str, path: str | Path, trusted: bool = False) -> AdapterFiles:
        """Check the name and the place, and read the adapter's files (the model is not touched: no step lock
        needed). Safetensors only: a server takes no pickles, even through ``weights_only``."""
        if not name or name == self.base_model or not NAME.match(name):
            raise ConfigError(f"an adapter cannot be named {name!r}: use letters, digits, '-' and '_' (not the base "
                              "model's name)")
        if name in self.loaded:
            raise ConfigError(f"an adapter named {name!r} is already loaded: unload it first")
        where = Path(path) if trusted else self.inside_adapter_dir(str(path))
        if where.is_dir() and not (where / WEIGHTS_NAME).is_file():
            raise ConfigError(f"{where} has no {WEIGHTS_NAME}: loratune serve loads safetensors only, no pickled "
                              "adapter_model.bin (PEFT's save_pretrained writes safetensors by default)")
        return read_adapter(self.model, where)

    def attach(self, name: str, files: AdapterFiles, busy: set[str]) -> list[str]:
        """Attach adapter files read by :meth:`read` (between engine steps), evicting as :meth:`load` says."""
        if name in self.loaded:
            raise ConfigError(f"an adapter named {name!r} is already loaded: unload it first")
        names = list(self.loaded)  # a snapshot: the event loop's thread may touch the order meanwhile
        victims = [n for n in names if n not in busy][:max(0, len(names) + 1 - self.max_adapters)]
        if len(names) + 1 - len(victims) > self.max_adapters:
            raise ConfigError(f"all {self.max_adapters} adapter places are in use by running requests; "
                              "try again when they finish, or raise --max-adapters")
        try:
            attach_adapter(self.model, files, name, activate=False)
            self.loaded[name] = files.adapter_dir
            for victim in victims:
                self._remove(victim)
        finally:
            self._bank()
        return victims

    def unload(self, name: str, busy: set[str]) -> None:
        if name not in self.loaded:
            raise KeyError(name)
        if name in busy:
            raise ConfigError(f"adapter {name!r} is in use by running requests; unload it when they finish")
        try:
            self._remove(name)
        finally:
            self._bank()

    def _remove(self, name: str) -> None:
        delete_adapter(self.model, name)
        del self.loaded[name]

    def _bank(self) -> None:
        self.banks.sync(list(self.loaded))  # the victims' slots emptied, the new adapter's slot written
