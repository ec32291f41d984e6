"""An auxiliary pool is untrusted input: nothing read through it may lead outside it.

A pool root is a directory (or URI prefix) of checkpoints published by anyone. On top of
the per-checkpoint checks of ``raysoup.io.validate`` (which every load runs), a pool is
refused when

- a symlink inside it (a file or a checkpoint directory) resolves outside the root, so
  that it cannot make raysoup read, say, ``~/.ssh`` or another user's files, and a
  symlinked checkpoint is refused rather than silently skipped by the listing;
- a checkpoint's metadata names a path outside the root in ``init.sources`` (the one
  path-like field a pool checkpoint records about its own making; relative sources are
  taken relative to the root).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from raysoup.io import storage
from raysoup.io.checkpoint import CheckpointError, CheckpointMeta
from raysoup.io.storage import Location


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _scheme_and_path(uri: str) -> tuple[str, str]:
    """``(scheme, normalised path)`` of a URI, its query dropped."""
    head, rest, _ = storage.split_uri(uri)
    return head.removesuffix("://").lower(), posixpath.normpath("/" + rest)


def source_inside(source: str, root: Location) -> bool:
    """Whether the metadata path ``source`` stays inside the pool ``root`` (lexically:
    ``..`` is collapsed; a URI must share the root's scheme and prefix)."""
    if storage.is_uri(root):
        scheme, path = _scheme_and_path(str(root))
        if storage.is_uri(source):
            other_scheme, other = _scheme_and_path(source)
            return other_scheme == scheme and _inside(other, path)
        if posixpath.isabs(source) or source.lower().startswith("file:"):
            return False  # a local path recorded in a remote pool
        return _inside(posixpath.normpath(posixpath.join(path, source)), path)
    if storage.is_uri(source) or source.lower().startswith("file:"):
        return False
    base = os.path.abspath(storage.local_path(root))  # file:// and ~ as the listing reads them
    target = os.path.normpath(os.path.join(base, os.path.expanduser(source)))
    return _inside(target, base) or _inside(target, str(Path(base).resolve()))


def check_meta_paths(meta: CheckpointMeta, root: Location, source: Location) -> None:
    """Refuse a checkpoint whose ``init.sources`` point outside the pool ``root``."""
    outside = [s for s in meta.init.get("sources", []) if not source_inside(s, root)]
    if outside:
        raise CheckpointError(
            f"{source}: init.sources {outside[:3]} point outside the auxiliary pool {root}; "
            f"a pool checkpoint may only name paths inside its pool"
        )


def escaping_symlinks(root: Path) -> list[tuple[Path, Path]]:
    """``(link, resolved target)`` of every symlink under ``root`` that leads outside it;
    symlinked directories are reported, never followed."""
    real_root = root.resolve()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if path.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # a link loop leads nowhere safe either
                    target = Path(os.readlink(path))
                if not target.is_relative_to(real_root):
                    found.append((path, target))
    return found


def check_pool_symlinks(root: Location) -> None:
    """Refuse a local pool holding a symlink that leads outside it (URIs have none)."""
    if storage.is_uri(root):
        return
    escaping = escaping_symlinks(storage.local_path(root))  # Path("file:///p") is not /p
    if escaping:
        link, target = escaping[0]
        raise CheckpointError(
            f"{link}: symlink resolves to {target}, outside the auxiliary pool {root} "
            f"({len(escaping)} such link(s)); a pool may only link inside itself"
        )
