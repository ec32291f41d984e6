"""Checkpoints: a directory with ``model.safetensors`` and ``raysoup.json``.

- Written atomically: a temporary sibling directory is filled, fsynced and renamed into
  place, so a crash leaves either the old checkpoint or the new one, never half of one.
- ``content_hash`` (sha256 of the safetensors file) is recorded in the JSON and checked
  on load: a truncated, corrupted or swapped file is reported, naming the file.
- Every checkpoint is read as untrusted input (``raysoup.io.validate``): the metadata's
  size and field types, and the safetensors header (tensor sizes, offsets, file size) are
  checked before the weights are hashed or loaded.
- Nothing is ever unpickled from a checkpoint. Foreign ``.pt``/``.pth``/``.pkl`` state
  dicts are imported with ``torch.load(weights_only=True)``, which refuses code objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from raysoup.io.atomic import fsync_tree, hidden_name, replace_dir, write_synced

if TYPE_CHECKING:  # torch is imported where tensors are read or written: reading metadata,
    import torch  # checking a header or a lease must not cost a torch import
from raysoup.io.validate import (
    CheckpointError,
    TensorEntry,
    check_classifier,
    check_meta_fields,
    parse_json,
    read_meta_bytes,
    read_safetensors_header,
)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "raysoup.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")


@dataclass
class CheckpointMeta:
    """What produced a checkpoint."""

    dataset: str
    envs: list[str]
    arch: str
    num_classes: int
    stage: str = "target"  # base | lp | aux | target | soup
    test_env: int = -1
    trial_seed: int = 0
    hparams_seed: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)  # strategy, sources, weights
    metrics: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path) -> CheckpointMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise CheckpointError(f"{source}: metadata lacks required fields {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    directory: str | Path, state_dict: Mapping[str, torch.Tensor], meta: CheckpointMeta
) -> CheckpointMeta:
    """Write ``state_dict`` and ``meta`` to ``directory`` atomically; returns the meta saved.

    Saving the same tensors again is idempotent: the content hash is unchanged.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / hidden_name(directory.name)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        weights = tmp / WEIGHTS_FILE
        from safetensors.torch import save_file

        try:
            save_file(tensors, str(weights))
        except SafetensorError as error:  # e.g. a full disk: say so as the OS error it is
            raise OSError(f"{weights}: could not write the weights ({error})") from error
        meta = dataclasses.replace(meta, content_hash=file_sha256(weights))
        write_synced(tmp / META_FILE, meta.to_json().encode())
        fsync_tree(tmp)
        replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def is_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / WEIGHTS_FILE).is_file() and (directory / META_FILE).is_file()


def not_a_checkpoint(location: object, meta_missing: bool = False) -> CheckpointError:
    """The error of a folder (local or URI) that holds no raysoup checkpoint."""
    why = f": {META_FILE} is missing" if meta_missing else ""
    return CheckpointError(
        f"{location} is not a raysoup checkpoint{why} (expected {WEIGHTS_FILE} and {META_FILE})"
    )


def hash_mismatch(
    weights: object, actual: str, expected: str, downloaded: bool = False
) -> CheckpointError:
    """The error of weights whose content hash is not the one their metadata records."""
    prefix, where = ("downloaded weights: ", "remote ") if downloaded else ("", "")
    return CheckpointError(
        f"{weights}: {prefix}content hash {actual[:16]}... does not match the "
        f"{expected[:16] or '<none>'}... recorded in {META_FILE}: the {where}file is corrupt, "
        f"truncated or was replaced"
    )


def read_meta(directory: str | Path) -> CheckpointMeta:
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise not_a_checkpoint(directory, meta_missing=True)
    return meta_from_bytes(read_meta_bytes(path), path)


def meta_from_bytes(raw: bytes, source: str | Path) -> CheckpointMeta:
    """Parse the bytes of a ``raysoup.json`` read from ``source`` (named in errors),
    refusing fields of the wrong type."""
    data = parse_json(raw, "metadata", source)
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: metadata must be a JSON object")
    check_meta_fields(data, source)
    return CheckpointMeta.from_dict(data, source)


def weights_header(path: Path) -> dict[str, TensorEntry]:
    """The checked safetensors header of ``path``; O(header), the tensors are not read."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    with open(path, "rb") as handle:
        return read_safetensors_header(handle, os.fstat(handle.fileno()).st_size, path)


def check_weights(directory: str | Path, meta: CheckpointMeta) -> dict[str, TensorEntry]:
    """The header of a checkpoint's weights, checked on its own and against ``meta``."""
    weights = Path(directory) / WEIGHTS_FILE
    header = weights_header(weights)
    check_classifier(header, meta.num_classes, weights)
    return header


def load_file(path: str) -> dict[str, torch.Tensor]:
    """safetensors' ``load_file``, imported on first use (torch comes with it)."""
    from safetensors.torch import load_file as load

    return load(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    weights_header(path)  # refuse a forged header before safetensors sees it
    return _load_checked(path)


def _load_checked(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({error})") from error


def load_checkpoint(
    directory: str | Path,
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    verify_hash: bool = True,
) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Read a checkpoint; check its metadata and header (before anything is hashed or
    loaded), its hash, and its keys and shapes against ``reference``."""
    directory = Path(directory)
    meta = read_meta(directory)
    weights = directory / WEIGHTS_FILE
    check_weights(directory, meta)
    if verify_hash:
        actual = file_sha256(weights)
        if actual != meta.content_hash:
            raise hash_mismatch(weights, actual, meta.content_hash)
    state = _load_checked(weights)
    if reference is not None:
        check_state_dict(state, reference, weights)
    return state, meta


def check_state_dict(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], source: str | Path
) -> None:
    """Raise ``CheckpointError`` naming ``source`` and the first offending tensors."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, expected in reference.items():
        if tuple(state[key].shape) != tuple(expected.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(expected.shape)}"
            )


def import_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a foreign file, without ever running pickled code.

    ``.safetensors`` is read directly; ``.pt/.pth/.pkl/.bin`` go through
    ``torch.load(weights_only=True)``. A dict wrapping the state dict under
    ``state_dict``, ``model_dict``, ``model`` or ``network`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported weights file; expected .safetensors or one of {PICKLE_SUFFIXES}"
        )
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for code objects, RuntimeError for junk
        raise CheckpointError(
            f"{path}: refused to load: only plain tensor state dicts are accepted "
            f"(torch.load with weights_only=True failed: {str(error).splitlines()[0]})"
        ) from error
    for wrapper in ("state_dict", "model_dict", "model", "network"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(f"{path}: not a state dict of named tensors")
    return dict(loaded)
