"""Output directories: one place that prepares them for every command, and a lock for runs.

People point loratune at their only copy of a run. So a command never writes into a directory
that already holds something unless told to (``--resume`` continues a run there, ``--overwrite``
replaces it), says in one line why an ``--out`` cannot be used (a file, a path under a file, a
place it may not write), and a training run holds a lock file in its directory that a second
run reports (with the holder's pid) and that a dead holder does not keep.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

LOCK_NAME = ".loratune.lock"
"""The lock file a training run keeps in its output directory while it runs."""


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
