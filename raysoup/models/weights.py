"""Reading someone else's weights: a file, a ``save_pretrained`` folder, a Hugging Face
cache entry, or a raysoup checkpoint — never unpickled, never downloaded here.

``read_weights(PATH)`` accepts

- a file: ``.safetensors``, or ``.pt/.pth/.bin/.pkl`` through
  ``torch.load(weights_only=True)`` (``raysoup.io.checkpoint.import_state_dict``);
- a raysoup checkpoint folder (``model.safetensors`` + ``raysoup.json``; its hash checked);
- a ``save_pretrained`` / Hub snapshot folder: ``model.safetensors``, sharded
  ``model.safetensors.index.json``, else ``pytorch_model.bin`` (or its index);
  ``config.json`` (timm's ``pretrained_cfg``) and ``preprocessor_config.json`` (HF's
  ``image_mean`` / ``image_std`` / ``size``) give the model's preprocessing;
- a Hugging Face cache entry ``.../models--ORG--NAME``: the snapshot ``refs/main`` names.

and returns the tensors renamed to featurizer keys (``raysoup.models.convert``), the
format they were read as, a content hash over the files read, and the preprocessing the
folder declares (if any).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raysoup.data.transforms import Preprocess
from raysoup.io.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    file_sha256,
    import_state_dict,
    is_checkpoint,
    load_checkpoint,
    read_meta,
)
from raysoup.models.convert import State, to_featurizer_names

SAFETENSORS_NAMES = ("model.safetensors", "pytorch_model.safetensors")
BIN_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.pth")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ForeignWeights:
    """A featurizer's tensors read from ``source``."""

    state: State  # featurizer keys
    source_format: str  # raysoup.models.convert.SOURCE_FORMATS
    source: str
    content_hash: str  # sha256 of the weights file (of the sorted files' hashes if sharded)
    preprocess: Preprocess | None  # what the folder's config declares
    head_outputs: int | None  # outputs of the source's classification head, if it had one
    architecture: str | None  # what the folder's config names (timm or HF), if anything


def hf_snapshot(path: Path) -> Path:
    """The snapshot folder of a Hugging Face cache entry (``models--ORG--NAME``), or
    ``path`` itself when it is not one."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return path
    ref = path / "refs" / "main"
    if ref.is_file():
        chosen = snapshots / ref.read_text().strip()
        if chosen.is_dir():
            return chosen
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) != 1:
        raise CheckpointError(
            f"{path}: Hugging Face cache entry with {len(found)} snapshots and no refs/main; "
            f"give the snapshot folder itself"
        )
    return found[0]


def _weight_files(folder: Path) -> list[Path]:
    for name in SAFETENSORS_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    for name in INDEX_NAMES:
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index}: not a weight index ({error})") from error
            files = [folder / shard for shard in shards]
            outside = [f for f in files if f.resolve().parent != folder.resolve()]
            if outside:
                raise CheckpointError(f"{index}: shard {outside[0]} lies outside {folder}")
            return files
    for name in BIN_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(
        f"{folder}: no weights found; expected one of {SAFETENSORS_NAMES + INDEX_NAMES + BIN_NAMES}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path}: corrupt JSON ({error})") from error
    return data if isinstance(data, dict) else {}


def declared_preprocess(folder: Path) -> Preprocess | None:
    """The preprocessing a Hub folder declares: timm's ``config.json`` ``pretrained_cfg``
    (``input_size``, ``mean``, ``std``, ``interpolation``), else HF's
    ``preprocessor_config.json`` (``size``, ``image_mean``, ``image_std``)."""
    cfg = _read_json(folder / "config.json").get("pretrained_cfg")
    if isinstance(cfg, dict) and {"mean", "std"} <= set(cfg):
        size = int(cfg.get("input_size", [3, 224, 224])[-1])
        interpolation = cfg.get("interpolation", "bilinear")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            interpolation = "bilinear"
        return Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]), interpolation)
    hf = _read_json(folder / "preprocessor_config.json")
    if {"image_mean", "image_std"} <= set(hf):
        size_field = hf.get("size", 224)
        if isinstance(size_field, dict):
            size_field = size_field.get("height") or size_field.get("shortest_edge") or 224
        resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(hf.get("resample", 2))
        return Preprocess(
            int(size_field), tuple(hf["image_mean"]), tuple(hf["image_std"]), resample or "bilinear"
        )
    return None


def declared_preprocess_at(path: str | Path) -> Preprocess | None:
    """What ``read_weights(path)`` would report as ``preprocess``, without reading the
    weights: a Hub folder's config, or a raysoup checkpoint's ``hparams["preprocess"]``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if is_checkpoint(path):
        recorded = read_meta(path).hparams.get("preprocess")
        return Preprocess.from_dict(recorded) if isinstance(recorded, dict) else None
    return declared_preprocess(hf_snapshot(path))


def _architecture(folder: Path) -> str | None:
    config = _read_json(folder / "config.json")
    if isinstance(config.get("architecture"), str):  # timm
        return f"timm:{config['architecture']}"
    names = config.get("architectures")
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None


def _head_outputs(state: dict[str, torch.Tensor]) -> int | None:
    for key in (
        "fc.weight",
        "head.weight",
        "classifier.weight",
        "classifier.1.weight",
        "head.fc.weight",
    ):
        tensor = state.get(key)
        if tensor is not None and tensor.dim() == 2:
            return int(tensor.shape[0])
    return None


def read_weights(path: str | Path, source_format: str | None = None) -> ForeignWeights:
    """A featurizer's tensors from ``path`` (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    preprocess = architecture = None
    if path.is_file():
        files = [path]
        raw = import_state_dict(path)
    elif is_checkpoint(path):
        files = [path / WEIGHTS_FILE]
        raw, meta = load_checkpoint(path)
        recorded = meta.hparams.get("preprocess")
        preprocess = Preprocess.from_dict(recorded) if isinstance(recorded, dict) else None
        architecture = meta.arch
    else:
        folder = hf_snapshot(path)
        files = _weight_files(folder)
        raw = {}
        for file in files:
            raw.update(import_state_dict(file))
        preprocess, architecture = declared_preprocess(folder), _architecture(folder)
    hashes = [file_sha256(f) for f in files]
    content_hash = (
        hashes[0]
        if len(hashes) == 1
        else hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()
    )
    head = _head_outputs({k.removeprefix("module."): v for k, v in raw.items()})
    state, fmt = to_featurizer_names(raw, str(path), source_format)
    if not state:
        raise CheckpointError(f"{path}: holds no featurizer tensors (read as {fmt!r})")
    return ForeignWeights(state, fmt, str(path), content_hash, preprocess, head, architecture)


def fetch_weights(arch: str, folder: str | Path) -> Path:
    """Download ``timm:<name>``'s pretrained weights from the Hugging Face Hub into
    ``folder`` (the driver does it once, into shared storage; runs then read the folder).
    Idempotent: a folder that already holds weights is returned as is."""
    from raysoup.models.networks import WeightsUnavailableError, import_timm, timm_name

    name = timm_name(arch)
    if not name:
        raise ValueError(f"fetch-weights {arch!r}: expected timm:<name>")
    folder = Path(folder).expanduser()
    try:
        _weight_files(folder)
        return folder
    except CheckpointError:
        pass
    cfg = import_timm().get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsUnavailableError(f"timm has no Hugging Face Hub weights for {name!r}")
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(cfg.hf_hub_id, local_dir=str(folder))
    except Exception as error:  # offline, a proxy, a missing repo: say which and why
        raise WeightsUnavailableError(
            f"could not download {cfg.hf_hub_id} into {folder} ({error}); copy a "
            f"save_pretrained folder there instead"
        ) from error
    return folder
