"""Files the recipes write so that nothing is lost: atomic replacement, flushed to disk, and locks.

A file is written beside its destination under a name of its own, flushed (``fsync``) and renamed
over the destination, and the rename is flushed too: a reader sees the old file or the new one,
never a part, also after a kill midway or a machine crash (without the flushes, a crash soon after
a rename can leave an empty file behind it on common filesystems).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

__all__ = ["write_atomic", "staged", "replace_durably", "flush_tree", "staging_path", "remove_abandoned", "locked"]


def _flush_folder(folder: str | Path) -> None:
    """Flush ``folder``'s entries (a rename in it). Where folders cannot be opened (Windows) the
    system orders this itself."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; they keep renames in order
        pass
    finally:
        os.close(fd)


def _flush_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def flush_tree(folder: str | Path) -> None:
    """Flush every file in ``folder`` (one level) and the folder itself, e.g. before renaming a
    staged folder into place."""
    folder = Path(folder)
    for entry in folder.iterdir():
        if entry.is_file():
            _flush_file(entry)
    _flush_folder(folder)


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """Flush the finished file (or folder, see :func:`flush_tree`) ``tmp``, rename it over ``path``
    and flush the rename."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir():
        flush_tree(tmp)
    else:
        _flush_file(tmp)
    os.replace(tmp, path)
    _flush_folder(path.parent)


def staging_path(path: str | Path) -> Path:
    """A new name beside ``path`` for a file or folder being built before it is renamed into place:
    ``<name>.tmp-<host>-<pid>-<random>``, so that :func:`remove_abandoned` can tell whose it is."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def remove_abandoned(folder: str | Path) -> None:
    """Remove the staging files and folders (:func:`staging_path`) in ``folder`` left by processes of
    this host that no longer run (killed mid-write): a corpus cache entry's can be large. Those of
    running processes, and of other hosts sharing the folder, are left alone."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return
    ours = re.compile(rf".+\.tmp-{re.escape(socket.gethostname())}-(\d+)-[0-9a-f]{{8}}")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        match = ours.fullmatch(name)
        if match is None or _running(int(match.group(1))):
            continue
        staging = Path(folder, name)
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it runs
        pass
    return True


@contextlib.contextmanager
def staged(path: str | Path):
    """Yield a :func:`staging_path` beside ``path`` for the block to write; when the block ends without
    an error, :func:`replace_durably` it over ``path``, else remove it. A reader of ``path`` sees the
    old file or the new one, never a part, also when the writer is killed midway (what a kill leaves
    behind, the next call's :func:`remove_abandoned` removes)."""
    path = Path(path)
    remove_abandoned(path.parent)
    tmp = staging_path(path)
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`staged`: a reader (a sweep deciding a run is done, a
    resume) sees the old file or the new one, never a part, also when the writer is killed midway."""
    with staged(path) as tmp, open(tmp, "x", encoding="utf-8") as f:  # mode 0666 less the umask, as open gives
        f.write(text)


@contextlib.contextmanager
def locked(path: str | Path, *, wait: bool = True):
    """An exclusive ``flock`` on the file ``path`` while the block runs; yields the open file (the
    holder may write itself into it), or None where there is no ``flock`` (not POSIX, some network
    filesystems): the block then runs unlocked. Without ``wait``, a lock another process holds raises
    ``BlockingIOError`` at once."""
    try:
        import fcntl
    except ImportError:
        yield None
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            holder = f
        except BlockingIOError:
            raise
        except OSError:  # a filesystem without locks
            holder = None
        try:
            yield holder
        finally:
            if holder is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
