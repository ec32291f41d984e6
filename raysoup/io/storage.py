"""Where a sweep's files live: a local path, or any ``pyarrow.fs`` URI (``s3://bucket/runs``).

A *location* is a local path (``Path`` or ``str``) or a URI string. Local paths work
exactly as plain files: nothing is staged, copied or cached. For a URI:

- **Small files** (``sweep.json``) are written to a hidden temporary key next to the
  target, then moved over it. On S3 the move is a server-side copy, and a single object
  PUT/copy is atomic (readers see the old object or the new one); on stores where a
  write in progress is visible (HDFS), the move is what makes it atomic.
- **Checkpoints are published** from a local directory (the trainer writes into a local
  staging directory, :func:`checkpoint_output`): the marker ``raysoup.json`` is removed
  first if present, ``model.safetensors`` is uploaded, and ``raysoup.json`` goes last. A
  remote directory is a checkpoint only once its marker exists (:func:`is_checkpoint`),
  so an interrupted upload leaves no checkpoint at all, never half of one.
- **Checkpoints are fetched** into a local cache, ``$RAYSOUP_CACHE/storage/`` (default
  ``~/.cache/raysoup/storage/``), one folder per checkpoint *version* (named after the
  URI and a digest of its metadata): the weights' sha256 is checked against the
  ``content_hash`` in the metadata before the folder is renamed into place, so a folder
  in the cache is always complete and verified, and is reused as long as the remote
  checkpoint is unchanged. The cache can be deleted at any time. Before anything is
  downloaded, the marker's size and fields and the weights' safetensors header are
  checked where they are (``raysoup.io.validate``): a forged checkpoint is refused unread.

Credentials and endpoints come from the environment, as Arrow reads them
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, an instance role, ``AWS_ENDPOINT_URL``...), or
from the URI's query (``s3://bucket/runs?endpoint_override=host:9000&scheme=http``).

Public API (``Location`` = ``Path | str``):

- :func:`is_uri`, :func:`resolve`, :func:`join`, :func:`filesystem` — naming things;
- :func:`check_writable`, :func:`dir_problem`, :func:`explain` — a clear error for a bad
  place before any work starts;
- :func:`exists`, :func:`is_dir`, :func:`is_file`, :func:`read_bytes`,
  :func:`write_bytes_atomic` — files;
- :func:`is_checkpoint`, :func:`read_meta`, :func:`check_weights`, :func:`find_checkpoints`
  — checkpoints in place;
- :func:`checkpoint_output`, :func:`publish_checkpoint` — writing a checkpoint;
- :func:`local_checkpoint` — a local directory to read a checkpoint from.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from raysoup.errors import EXIT_BAD_INPUT, BadInputError, EnvironmentProblemError
from raysoup.io.atomic import atomic_write_bytes, fsync_dir, fsync_tree, hidden_name, replace_dir
from raysoup.io.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    file_sha256,
    hash_mismatch,
    meta_from_bytes,
    not_a_checkpoint,
)
from raysoup.io.checkpoint import check_weights as _check_local_weights
from raysoup.io.checkpoint import is_checkpoint as _is_local_checkpoint
from raysoup.io.checkpoint import read_meta as _read_local_meta
from raysoup.io.validate import (
    MAX_META_BYTES,
    TensorEntry,
    check_classifier,
    check_meta_size,
    read_meta_bytes,
    read_safetensors_header,
)

Location = Path | str
STORAGE_CACHE = "storage"  # under the raysoup cache dir
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def default_cache_dir() -> Path:
    """``$RAYSOUP_CACHE``, else ``~/.cache/raysoup``."""
    return Path(os.environ.get("RAYSOUP_CACHE", Path.home() / ".cache" / "raysoup"))


# ---------------------------------------------------------------- naming


def has_scheme(location: Location) -> bool:
    """True for text of the form ``scheme://...`` (``file://`` included): a location
    that must stay a string, since ``Path`` would collapse its ``//``."""
    return not isinstance(location, os.PathLike) and _SCHEME.match(location) is not None


def is_uri(location: Location) -> bool:
    """True for a URI with a scheme other than ``file://`` (``file://`` is a local path)."""
    if isinstance(location, os.PathLike):
        return False
    match = _SCHEME.match(location)
    return match is not None and match.group(1).lower() != "file"


def split_uri(uri: str) -> tuple[str, str, str]:
    """``("scheme://", "netloc/path", "?query")``; string surgery, not ``urlunsplit``, which
    drops the ``//`` of URIs with an empty authority (``hdfs:///path``)."""
    match = _SCHEME.match(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not a URI (expected scheme://...)")
    end = match.end()
    rest, mark, query = uri[end:].partition("?")
    return uri[:end], rest, mark + query


def local_path(location: Location) -> Path:
    """A local location as a ``Path`` (``file:///x`` becomes ``/x``, ``~`` is expanded)."""
    text = os.fspath(location)
    if text.lower().startswith("file://"):
        return Path(unquote(urlsplit(text).path))
    return Path(text).expanduser()


def resolve(location: Location) -> Location:
    """An absolute, canonical location: local paths resolved, URIs kept as they are
    (minus a trailing ``/``), never passed through ``Path`` (it would collapse ``//``)."""
    if is_uri(location):
        head, path, query = split_uri(str(location))
        return head + (path.rstrip("/") or path) + query
    return local_path(location).resolve()


def join(location: Location, *parts: str) -> Location:
    """``location / part / ...``: a ``Path`` for a local location, a URI string for a URI
    (a query such as ``?endpoint_override=...`` stays at the end)."""
    if not is_uri(location):
        return local_path(location).joinpath(*parts)
    head, path, query = split_uri(str(location))
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return head + path + query
    return head + path.rstrip("/") + "/" + tail + query


def filesystem(location: Location) -> tuple[pafs.FileSystem, str]:
    """``(Arrow filesystem, path inside it)`` of ``location``."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(local_path(location).absolute())
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except ValueError as error:  # ArrowInvalid: unknown scheme, malformed URI
        raise StorageLocationError(f"storage {location!r}: not a usable URI ({error})") from error
    return fs, path.rstrip("/")


# ---------------------------------------------------------------- a usable place


class StorageError(EnvironmentProblemError):
    """Storage that cannot be reached or written (bucket missing, credentials refused,
    endpoint down, disk full, read-only); the message says which and what to do."""


class StorageLocationError(StorageError, BadInputError):
    """A storage location that cannot be one: a malformed URI, a file where a folder
    must be. Fix the argument."""

    exit_code = EXIT_BAD_INPUT
    label = "error"


def explain(error: OSError) -> str:
    """A short reason from an OS or Arrow (S3, GCS) error."""
    text = str(error)
    lowered = text.lower()
    if "nosuchbucket" in lowered or ("bucket" in lowered and "not found" in lowered):
        return "the bucket does not exist (create it first, or check its name)"
    if any(s in lowered for s in ("access_denied", "accessdenied", "forbidden", "403")):
        return "access denied (check the credentials: AWS_ACCESS_KEY_ID, AWS_PROFILE...)"
    if any(s in lowered for s in ("invalidaccesskeyid", "signaturedoesnotmatch")):
        return "the credentials were rejected (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "couldn't connect" in lowered or "curlcode: 7" in lowered or "connection refused" in lowered:
        return "cannot reach the endpoint (AWS_ENDPOINT_URL, endpoint_override, network)"
    if isinstance(error, PermissionError):
        return "permission denied"
    if error.errno == 28:  # ENOSPC
        return "no space left on the device"
    if error.errno == 30:  # EROFS
        return "read-only file system"
    return text.splitlines()[0] if text else type(error).__name__


def _file_on_the_way(path: Path) -> Path | None:
    """The first existing non-directory on the way to ``path`` (``path`` included)."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
        if not part.exists():
            return None
    return None


def check_writable(location: Location) -> None:
    """Raise ``StorageError`` unless a sweep can write under ``location``: not a file (nor
    under one), creatable, writable, and, for a URI, a reachable bucket with credentials
    that may write. Writes and deletes one small probe file, so the error comes before Ray
    starts or anything trains."""
    if not is_uri(location):
        path = local_path(location).absolute()
        blocker = _file_on_the_way(path)
        if blocker is not None:
            raise StorageLocationError(
                f"storage {location}: {blocker} is a file, not a directory; "
                f"give --storage a directory (it is created if missing)"
            )
    probe = join(location, f".raysoup-probe-{uuid.uuid4().hex}")
    try:
        write_bytes_atomic(probe, b"raysoup storage probe")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except OSError as error:
        raise StorageError(f"storage {location}: cannot write there: {explain(error)}") from error


# ---------------------------------------------------------------- small files


def _info(location: Location) -> pafs.FileInfo:
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: Location) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_dir(location: Location) -> bool:
    """A directory (on object stores: a prefix with objects under it)."""
    if not is_uri(location):
        return local_path(location).is_dir()
    return _info(location).type == pafs.FileType.Directory


def is_file(location: Location) -> bool:
    """A file (on object stores: an object)."""
    if not is_uri(location):
        return local_path(location).is_file()
    return _info(location).type == pafs.FileType.File


def dir_problem(location: Location) -> str | None:
    """Why ``location`` is not a directory that can be read: missing, a malformed URI or
    unknown scheme, an unreachable store, refused credentials; ``None`` when it is one."""
    try:
        return None if is_dir(location) else "no such directory"
    except ValueError as error:  # from filesystem(): the URI itself is wrong
        return f"not a usable URI ({error.__cause__ or error})"
    except OSError as error:
        return f"cannot read it: {explain(error)}"


def read_bytes(location: Location) -> bytes:
    if not is_uri(location):
        return local_path(location).read_bytes()
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as handle:
            return handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location} does not exist") from None


def _put_atomic(fs: pafs.FileSystem, path: str, data: bytes | memoryview) -> None:
    """Write a temporary hidden key, then move it over ``path`` (see the module doc)."""
    parent, name = posixpath.split(path)
    tmp = f"{parent}/{hidden_name(name)}"
    try:
        with fs.open_output_stream(tmp) as handle:
            handle.write(data)
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def write_bytes_atomic(location: Location, data: bytes | memoryview) -> None:
    """Replace ``location`` with ``data``: readers see the old bytes or the new, never a
    mix (local: write, fsync, rename; URI: temporary key, then move)."""
    write_atomic_in(*filesystem(location), data)


def write_atomic_in(fs: pafs.FileSystem, path: str, data: bytes | memoryview) -> None:
    """``write_bytes_atomic`` for a caller that holds the filesystem (``path`` inside it)."""
    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write_bytes(path, data)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    _put_atomic(fs, path, data)


# ---------------------------------------------------------------- checkpoints in place


def is_checkpoint(location: Location) -> bool:
    """Both ``model.safetensors`` and the marker ``raysoup.json`` exist."""
    if not is_uri(location):
        return _is_local_checkpoint(local_path(location))
    fs, path = filesystem(location)
    infos = fs.get_file_info([f"{path}/{WEIGHTS_FILE}", f"{path}/{META_FILE}"])
    return all(info.type == pafs.FileType.File for info in infos)


def read_meta(location: Location) -> CheckpointMeta:
    """The metadata of the checkpoint at ``location``, without fetching its weights."""
    if not is_uri(location):
        return _read_local_meta(local_path(location))
    marker = join(location, META_FILE)
    try:
        raw = _read_marker(marker)
    except FileNotFoundError:
        raise not_a_checkpoint(location, meta_missing=True) from None
    return meta_from_bytes(raw, marker)


def _read_marker(marker: str) -> bytes:
    """A remote ``raysoup.json``: its size is checked before it is read (and the read is
    bounded), since a pool may come from anyone."""
    fs, path = filesystem(marker)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{marker} does not exist")
    check_meta_size(info.size or 0, marker)
    with fs.open_input_stream(path) as handle:
        raw = handle.read(MAX_META_BYTES + 1)
    check_meta_size(len(raw), marker)
    return raw


def _check_remote_weights(location: str) -> dict[str, TensorEntry]:
    """The checked safetensors header of a remote checkpoint's weights, read before they
    are downloaded (two small ranged reads)."""
    weights = join(location, WEIGHTS_FILE)
    fs, path = filesystem(weights)
    with fs.open_input_file(path) as handle:
        return read_safetensors_header(handle, handle.size(), weights)


def check_weights(location: Location, meta: CheckpointMeta) -> None:
    """Check the weights header of the checkpoint at ``location`` on its own and against
    its metadata ``meta`` (O(header); a URI's weights are not downloaded)."""
    if not is_uri(location):
        _check_local_weights(local_path(location), meta)
        return
    header = _check_remote_weights(str(location))
    check_classifier(header, meta.num_classes, join(location, WEIGHTS_FILE))


def find_checkpoints(root: Location) -> list[Location]:
    """The checkpoints at or under ``root``: ``root`` itself first if it is one, then the
    others sorted by path; hidden folders (temporary writes) are skipped."""
    if not is_uri(root):
        base = local_path(root)
        found = [base] if _is_local_checkpoint(base) else []
        found += sorted(p.parent for p in base.rglob(META_FILE) if p.parent != base)
        return [p for p in found if _is_local_checkpoint(p) and not p.name.startswith(".")]
    fs, path = filesystem(root)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    files = {
        info.path[len(path) + 1 :]
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    }
    folders = sorted(
        posixpath.dirname(name)
        for name in files
        if posixpath.basename(name) == META_FILE
        and posixpath.join(posixpath.dirname(name), WEIGHTS_FILE) in files
    )
    return [
        join(root, *folder.split("/")) if folder else root
        for folder in folders
        if not any(part.startswith(".") for part in folder.split("/"))
    ]


def checkpoint_damage(location: Location) -> str | None:
    """Why the checkpoint at ``location`` is not intact as far as cheap checks tell (both
    files present, its metadata valid, its weights file exactly as long as its safetensors
    header says: a truncated upload or write), or ``None``. Reads the header only; a
    same-size corruption is caught when the weights are read (:func:`verify`)."""
    if not is_checkpoint(location):
        return f"not a checkpoint (expected {WEIGHTS_FILE} and {META_FILE})"
    weights = join(location, WEIGHTS_FILE)
    try:
        read_meta(location)
        fs, path = filesystem(weights)
        with fs.open_input_file(path) as handle:
            read_safetensors_header(handle, handle.size(), weights)
    except (CheckpointError, OSError) as error:
        return str(error)
    return None


def verify(location: Location) -> str | None:
    """Why the checkpoint at ``location`` is damaged (any check, its weights' sha256
    against the recorded ``content_hash`` included: reads every byte), or ``None``."""
    damage = checkpoint_damage(location)
    if damage is not None:
        return damage
    try:
        if is_uri(location):
            local_checkpoint(location)  # fetched and hash-checked, or an error
        else:
            _check_local_checkpoint(local_path(location))
    except (CheckpointError, OSError) as error:
        return str(error)
    return None


# ---------------------------------------------------------------- writing a checkpoint


def _check_local_checkpoint(directory: Path) -> bytes:
    """The marker bytes of a complete local checkpoint whose weights match its hash."""
    if not _is_local_checkpoint(directory):
        raise not_a_checkpoint(directory)
    raw = read_meta_bytes(directory / META_FILE)
    expected = meta_from_bytes(raw, directory / META_FILE).content_hash
    actual = file_sha256(directory / WEIGHTS_FILE)
    if actual != expected:
        raise hash_mismatch(directory / WEIGHTS_FILE, actual, expected)
    return raw


def publish_checkpoint(local_dir: Location, location: Location) -> None:
    """Copy the checkpoint in ``local_dir`` to ``location`` so that it appears complete
    or not at all (the marker ``raysoup.json`` is uploaded last; a previous marker at
    ``location`` is removed first). A no-op when ``location`` is ``local_dir`` itself."""
    source = local_path(local_dir)
    marker = _check_local_checkpoint(source)
    if not is_uri(location):
        target = local_path(location)
        if target.absolute() == source.absolute():
            return
        _copy_local_checkpoint(source, target)
        return
    fs, path = filesystem(location)
    local_fs = pafs.LocalFileSystem()
    fs.create_dir(path, recursive=True)
    if fs.get_file_info(f"{path}/{META_FILE}").type == pafs.FileType.File:
        fs.delete_file(f"{path}/{META_FILE}")  # from now on, not a checkpoint
    for item in sorted(source.iterdir()):
        if item.name != META_FILE and item.is_file() and not item.name.startswith("."):
            pafs.copy_files(
                str(item),
                f"{path}/{item.name}",
                source_filesystem=local_fs,
                destination_filesystem=fs,
            )
    _put_atomic(fs, f"{path}/{META_FILE}", marker)


def _copy_local_checkpoint(source: Path, target: Path) -> None:
    """Copy into a hidden sibling, fsync, rename into place (the old one moved aside)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / hidden_name(target.name)
    try:
        shutil.copytree(source, tmp)
        fsync_tree(tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def checkpoint_output(location: Location, cache_dir: Path | None = None) -> Iterator[Path]:
    """The local directory to write the checkpoint of ``location`` into.

    Local: ``location`` itself (written in place, nothing else happens). URI: a fresh
    staging directory in the cache, published to ``location`` when the block exits
    without error, and then kept as the cached copy :func:`local_checkpoint` returns.
    """
    if not is_uri(location):
        yield local_path(location)
        return
    cache = _storage_cache(cache_dir)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    try:
        local = staging / _name(location)
        yield local
        publish_checkpoint(local, location)
        target = cache / _cache_name(location, (local / META_FILE).read_bytes())
        _rename_into_place(local, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- reading a checkpoint


def _storage_cache(cache_dir: Path | None) -> Path:
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / STORAGE_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _name(location: Location) -> str:
    return posixpath.basename(urlsplit(str(location)).path.rstrip("/")) or "checkpoint"


def _cache_name(location: Location, marker: bytes) -> str:
    """One folder per (URI, metadata): a republished checkpoint gets a new folder."""
    digest = hashlib.sha256(str(resolve(location)).encode() + b"\0" + marker).hexdigest()
    return f"{_name(location)}-{digest[:24]}"


def _rename_into_place(tmp: Path, target: Path) -> None:
    """Rename a verified folder to its cache name; if another process got there first,
    its (equally verified) copy stays."""
    fsync_tree(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_local_checkpoint(target):
            raise
    fsync_dir(target.parent)


def local_checkpoint(location: Location, cache_dir: Path | None = None) -> Path:
    """A local directory holding the checkpoint at ``location``, to read it with
    ``raysoup.io.load_checkpoint``.

    Local: the path itself (nothing copied). URI: a verified copy in the cache
    (``$RAYSOUP_CACHE/storage/``), downloaded on first use and reused while the remote
    checkpoint is unchanged. Raises ``CheckpointError`` if ``location`` holds no
    checkpoint, or if the downloaded weights do not match the recorded content hash.
    """
    if not is_checkpoint(location):
        raise not_a_checkpoint(location)
    if not is_uri(location):
        return local_path(location)
    marker_location = join(location, META_FILE)
    marker = _read_marker(str(marker_location))
    expected = meta_from_bytes(marker, marker_location).content_hash  # 64 hex, checked
    cache = _storage_cache(cache_dir)
    target = cache / _cache_name(location, marker)
    if _is_local_checkpoint(target):
        return target
    _check_remote_weights(str(location))
    fs, path = filesystem(location)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
    try:
        selector = pafs.FileSelector(path, recursive=False)
        names = sorted(
            info.base_name
            for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name != META_FILE
            and not info.base_name.startswith(".")
        )
        for name in names:
            pafs.copy_files(
                f"{path}/{name}",
                str(tmp / name),
                source_filesystem=fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        actual = file_sha256(tmp / WEIGHTS_FILE)
        if actual != expected:
            raise hash_mismatch(join(location, WEIGHTS_FILE), actual, expected, downloaded=True)
        atomic_write_bytes(tmp / META_FILE, marker)
        _rename_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
