"""Output directories: one place that prepares them for every command, and a lock for runs.

People point loratune at their only copy of a run. So a command never writes into a directory
that already holds something unless told to (``--resume`` continues a run there, ``--overwrite``
replaces it), says in one line why an ``--out`` cannot be used (a file, a path under a file, a
place it may not write), and a training run holds a lock file in its directory that a second
run reports (with the holder's pid) and that a dead holder does not keep.

Two more rules keep a user's own files safe:
- an output directory never is, or holds, an input of the same command (model, adapter, data,
  recipe, tokenizer): :func:`refuse_inputs_inside`, called by every command that writes;
- ``--overwrite`` removes only what loratune wrote. A run lists the names it writes in
  ``.loratune-manifest.json`` before it writes them; anything else in the directory is the
  user's and is never removed, and a run that would replace such a file is refused
  (:func:`refuse_replacing`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ConfigError
from .fsutil import fsync_dir

LOCK_NAME = ".loratune.lock"
"""The lock file a training run keeps in its output directory while it runs."""
MANIFEST_NAME = ".loratune-manifest.json"
"""The list of names loratune wrote in an output directory: what ``--overwrite`` may remove."""


def refuse_inputs_inside(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]], flag: str = "--out",
                         own: Iterable[str | Path] = ()) -> None:
    """Refuse (ConfigError, one line) an output directory that is, or holds, one of ``inputs``.

    ``inputs`` are (what, path) pairs, e.g. ("the model", "runs/a/model"); a path that does not
    exist here (a hub id, or a missing file that its own check reports) is skipped. Paths are
    compared resolved, so ``..`` and symlinks do not hide an input. ``own`` are files loratune
    wrote in ``out`` itself that may be read back (a resumed run's own recipe.yaml).
    Why: ``--overwrite`` clears the directory and a run writes its results there, so an input
    inside it is lost (a full fine-tune once wrote its weights over the base model it read).
    """
    target = Path(out).expanduser().resolve()
    allowed = {Path(p).expanduser().resolve() for p in own}
    for what, path in inputs:
        if path is None or not str(path) or not Path(path).expanduser().exists():
            continue
        where = Path(path).expanduser().resolve()
        if where in allowed or not (where == target or target in where.parents):
            continue
        relation = "is" if where == target else "holds"
        shown = f"{path} ({where})" if Path(path).expanduser() != where else str(path)
        raise ConfigError(f"{flag} {out} {relation} {what} {shown}: outputs are never written where an input is "
                          f"(a run there would replace or remove it); choose another {flag}, or move {what} "
                          f"out of {out}")


def read_manifest(out: Path) -> set[str] | None:
    """The names loratune wrote in ``out``, or None when it keeps no manifest (new, or written by an
    older loratune). A manifest that cannot be read is a ConfigError: nothing there can be told apart."""
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = data["outputs"]
        if not isinstance(names, list) or not all(_plain_name(n) for n in names):
            raise ValueError("'outputs' must list plain file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a loratune manifest ({exc}), so loratune cannot tell its own files there "
                          f"from yours: remove the files yourself, or choose another --out") from None
    return set(names)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", MANIFEST_NAME, LOCK_NAME) and "/" not in name \
        and "\\" not in name and "\0" not in name


def owned_outputs(out: Path, earlier_run: Iterable[str] = ()) -> set[str]:
    """The names in ``out`` that loratune wrote: its manifest's. A directory without a manifest that
    an older loratune wrote (the caller says so by naming, in ``earlier_run``, the outputs such a
    run writes; a training run passes them only where a complete checkpoint is found) counts those
    of them that exist as loratune's; otherwise nothing there is loratune's."""
    names = read_manifest(out)
    if names is not None:
        return names
    return {n for n in earlier_run if (out / n).exists() or (out / n).is_symlink()}


def refuse_replacing(out: Path, writes: Iterable[str], owned: set[str], flag: str = "--out") -> None:
    """Refuse (one line) when a name this command writes in ``out`` exists there and loratune did not
    write it (it is not in ``owned``): a user's own metrics.jsonl or recipe.yaml is never replaced."""
    theirs = sorted(n for n in writes if n not in owned and ((out / n).exists() or (out / n).is_symlink()))
    if theirs:
        raise ConfigError(f"{flag} {out} holds {', '.join(theirs)}, which loratune did not write there (its "
                          f"{MANIFEST_NAME} does not list {'it' if len(theirs) == 1 else 'them'}) and this run "
                          f"would replace: move {'it' if len(theirs) == 1 else 'them'} elsewhere, or choose "
                          f"another {flag}")


def remove_outputs(out: Path, names: Iterable[str]) -> list[str]:
    """Delete the named entries of ``out`` (loratune's own, from its manifest); returns what went.

    Each is renamed to ``.trash-NAME-PID`` first and deleted after, so a kill in between leaves a
    hidden name, never a half-deleted output that looks whole. A symlink is removed, not followed.
    """
    gone, names = [], sorted(names)
    for name in names:
        path = out / name
        if not (path.exists() or path.is_symlink()):
            continue
        trash = out / f".trash-{name}-{os.getpid()}"
        os.replace(path, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
        gone.append(name)
    for stale in (p for name in names for p in out.glob(f".trash-{name}-*")):  # a killed removal's leftovers
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if gone:
        fsync_dir(out)
    return gone


def record_outputs(out: Path, names: Iterable[str]) -> None:
    """Add ``names`` to ``out``'s manifest (written whole: a temporary file renamed over it).
    Called before those outputs are written, so nothing loratune writes is ever unlisted."""
    known = read_manifest(out) or set()
    listed = sorted(known | set(names))
    tmp = out / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"format": 1, "writer": "loratune", "outputs": listed}, indent=1) + "\n",
                   encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)
    fsync_dir(out)


def prepare_output_dir(path: str | Path, flag: str = "--out", resume: bool = False, overwrite: bool = False,
                       create: bool = True, remedy: str | None = None) -> Path:
    """Make sure ``path`` can be written, or refuse in one line; returns it.

    A directory that exists and holds anything but a stale lock is refused unless ``resume`` or
    ``overwrite`` (``remedy`` replaces the advice for commands without those flags); ``flag``
    names the option in the message. With ``create`` the directory is made (a run writes into
    it); without, only its parent is made and probed (an export that writes a temporary sibling
    and renames it into place). Nothing existing is changed here.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a directory: choose another {flag}")
    held = _contents(out) if out.is_dir() else []
    if held and not (resume or overwrite):
        remedy = remedy or f"pass --resume to continue a run there, --overwrite to replace it, or choose another {flag}"
        raise ConfigError(f"{flag} {out} exists and is not empty (it holds {', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}): {remedy}")
    target = out if create else out.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file somewhere on the way
        raise ConfigError(f"cannot create {flag} {out}: a part of that path is a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {flag} {out}: {exc.strerror or exc}") from None
    _check_writable(target, flag, out)
    return out


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)


def _check_writable(directory: Path, flag: str, out: Path) -> None:
    probe = directory / f".loratune-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write {flag} {out}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[Path]:
    """Hold ``path/.loratune.lock`` while the block runs.

    The file holds the holder's pid and host. A lock whose process is gone (killed, crashed) is
    stale and is taken over; a live holder's lock is a ConfigError naming its pid.
    """
    lock = path / LOCK_NAME
    _acquire(lock)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if _read_lock(lock) == (os.getpid(), socket.gethostname()):
                lock.unlink()


def _acquire(lock: Path) -> None:
    for _ in range(2):  # a stale lock is removed once, then taken with O_EXCL (a racing run may win)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None and _alive(*holder):
                raise ConfigError(f"{lock.parent} is in use by another loratune run (pid {holder[0]} on "
                                  f"{holder[1]}): wait for it to finish, stop it, or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its run is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return
    raise ConfigError(f"{lock.parent} was locked by another loratune run as this one started: choose another --out")


def _read_lock(lock: Path) -> tuple[int, str] | None:
    try:
        pid, _, host = lock.read_text().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None  # unreadable or half-written: treated as stale


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's run (a shared file system): we cannot tell, so we respect it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
