"""One writer per folder: an exclusive lock that names its holder.

`hold(folder, command)` takes an exclusive `flock` on `.<name>-loraft.lock` beside the folder (beside, not inside:
`--overwrite` deletes the folder, and merge's output does not exist until it is renamed into place), and
writes the holder's pid and command into it. A second writer fails at once with a LoraftError (exit 2)
naming them. The kernel drops an flock when its process dies, however it dies, so a lock file left by a
killed process holds no lock: the next writer takes it over. The file is removed on release; a writer
that locked a file just removed re-opens the new one (inode check), so two writers never both hold it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lora_ft.artifacts.run_dir import check_writable_folder, remove_leftovers
from lora_ft.errors import LoraftError


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder).expanduser().absolute()
    # not ".NAME.": atomic_dir stages the folder itself as ".NAME.<random>.partial" beside it
    return folder.parent / f".{folder.name}-loraft.lock"


@contextmanager
def hold(folder: str | Path, command: str, *, what: str = "output folder") -> Iterator[Path]:
    """Hold the folder's lock for the duration of the block; LoraftError if another process holds it."""
    folder = Path(folder).expanduser().absolute()
    check_writable_folder(folder, what)
    created = _make_parents(folder.parent)
    path = lock_path(folder)
    fd = _acquire(path, folder, what)
    try:
        holder = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiting writer then finds the inode changed
        os.close(fd)
        for parent in created:  # folders made only to hold the lock, if the command wrote nothing in them
            try:
                parent.rmdir()
            except OSError:
                break


def holder_of(folder: str | Path) -> dict | None:
    """The pid/command recorded by the lock's holder, or None when nobody holds it."""
    path = lock_path(folder)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire(path: Path, folder: Path, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} ({holder.get('command', 'command unknown')})" if holder else "another process"
            raise LoraftError(
                f"{what} {folder} is in use by {who}; wait for it to finish or choose another folder "
                f"(one writer per folder)"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed it between our open and our lock: open the new one


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for item in reversed(missing):
        item.mkdir(exist_ok=True)
    return missing


def sweep_leftovers(final: str | Path, warn) -> None:
    """Before writing `final`: remove the staging folders a killed earlier writer left beside it, and say so.
    The holder of `final`'s lock removes every one; anyone else only those whose process is gone."""
    owner = (holder_of(final) or {}).get("pid") == os.getpid()
    for item in remove_leftovers(Path(final), owner=owner):
        warn(f"removed {item.name}, left beside {Path(final).name} by an earlier run that was killed")
