"""Crash-safe local writes, the only implementation of each: write a hidden temporary
sibling, fsync it, rename it over the target, fsync the folder. (URIs: see
``raysoup.io.storage``, which uses the same hidden names.)"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def hidden_name(name: str) -> str:
    """The temporary name a write of ``name`` goes to first (readers skip dot-files)."""
    return f".{name}.tmp-{uuid.uuid4().hex}"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic by itself: for temporaries)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_tree(directory: Path) -> None:
    """fsync every file directly in ``directory``, then the directory itself (a
    checkpoint folder is flat), before it is renamed into place."""
    for item in directory.iterdir():
        if item.is_file():
            with open(item, "rb+") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data``: readers see the old bytes or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / hidden_name(path.name)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished (fsynced) directory ``tmp`` to ``target``, replacing any old
    one. The old directory is moved aside first, so a crash in between leaves it
    recoverable (under a hidden ``.<name>.old-*`` sibling) rather than half-deleted."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)
