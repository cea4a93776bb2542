"""Directories that are complete or absent: write under a temporary name, then swap into place.

Also the one place that recognises a failed write for what it is: the safetensors writer (Rust)
reports a full disk as ``SafetensorError("... I/O error: No space left on device (os error 28)")``
and ``torch.save`` as a ``RuntimeError`` whose context is the ``OSError``; :func:`write_os_error`
turns both back into the ``OSError`` they are, so every caller handles one kind of failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import LoratuneError, ResourceError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""errno values that mean the device (or the user's quota, or the file size limit) has no room left."""

_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error names the errno
_OS_WORDS = ((errno.ENOSPC, "No space left"), (errno.EDQUOT, "quota exceeded"), (errno.EFBIG, "File too large"))


def fsync_tree(path: Path) -> None:
    """Flush every file in ``path`` and the directory itself to disk."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` directory to ``final``.

    An existing ``final`` is first renamed aside and deleted only once the new one is in place,
    so at every moment one complete version exists (as ``final`` or as ``.old-<name>-<pid>``).
    """
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Write a directory that is complete or absent: yields a fresh temporary sibling of ``final``
    (``.tmp-<name>-<pid>``) to fill; on a normal exit it replaces ``final`` (:func:`replace_dir`),
    on any exception it is removed and the exception goes on."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = write_os_error(exc) if isinstance(exc, Exception) else None
        if cause is not None and cause is not exc:
            raise cause from exc
        raise


def write_os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write, or None when ``exc`` is not one.

    Why: only an ``OSError`` says which errno it was (a full disk needs other advice than a
    permission problem), but the writers we use hide it: safetensors raises its own
    ``SafetensorError`` whose message ends in ``(os error 28)``, and ``torch.save`` into a file
    object raises a ``RuntimeError`` with the ``OSError`` as its context.
    """
    for _ in range(8):  # the exception, then what it was raised from or during
        if exc is None or isinstance(exc, LoratuneError):  # ours already say what happened
            return None
        if isinstance(exc, OSError):
            return exc
        if type(exc).__name__ == "SafetensorError":
            text = str(exc)
            match = _OS_ERROR.search(text)
            code = int(match.group(1)) if match else next((c for c, words in _OS_WORDS if words in text), None)
            return OSError(code, os.strerror(code)) if code is not None else None
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return None


def disk_full(exc: BaseException) -> bool:
    """Whether a failed write failed for want of space (see :data:`DISK_FULL`)."""
    found = write_os_error(exc)
    return found is not None and found.errno in DISK_FULL


@contextlib.contextmanager
def full_disk_is_a_resource_error(what: str, advice: str) -> Iterator[None]:
    """Inside the block, a write that fails for want of space becomes a :class:`ResourceError` naming
    ``what`` and ending in ``advice`` (what was kept, what to do); other errors go on unchanged."""
    try:
        yield
    except Exception as exc:
        if not disk_full(exc):
            raise
        reason = write_os_error(exc).strerror or str(exc)
        raise ResourceError(f"no space left on the device while writing {what} ({reason}); {advice}") from None
