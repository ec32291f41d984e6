"""Checks that let a checkpoint written by a stranger be read safely.

Auxiliary pools recycle fine-tunings published by others, so every checkpoint is read as
untrusted input. These checks run before anything expensive (hashing, loading tensors)
and each refusal is a ``CheckpointError`` naming the file and what was expected.

- Metadata (``raysoup.json``): at most :data:`MAX_META_BYTES` (checked before reading),
  and every field of the right type (:func:`meta_problems`).
- Weights (``model.safetensors``): the header is parsed here, not by safetensors: its
  length must fit the file, every tensor's ``dtype x shape`` must equal its byte range,
  and the ranges must tile the data exactly, no overlap, hole or trailing bytes
  (:func:`check_safetensors_header`). Only the first ``8 + header`` bytes are read.
- Weights against metadata: the last classifier layer has ``num_classes`` outputs.

All functions but the two readers at the bottom are pure.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from raysoup.contract import SOUP_STAGE, STAGES
from raysoup.errors import BadInputError

MAX_META_BYTES = 1 << 20  # ours are ~1 KB; a bound keeps a hostile file out of memory
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
KNOWN_FORMAT_VERSIONS = (1,)
CHECKPOINT_STAGES = (*STAGES, SOUP_STAGE)
HEADER_LENGTH_BYTES = 8  # little-endian u64 before the JSON header
# Bits per element of every safetensors dtype (sub-byte floats pack several per byte).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class CheckpointError(BadInputError):
    """A checkpoint is missing, corrupt, or does not fit; the message names the file."""


class TensorEntry(NamedTuple):
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section (after the header)
    end: int


# ---------------------------------------------------------------- metadata


def check_meta_size(size: int, source: str | Path) -> None:
    if size > MAX_META_BYTES:
        raise CheckpointError(
            f"{source}: metadata is {size} bytes, more than the {MAX_META_BYTES} a "
            f"raysoup.json may have; refused unread"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _init_problems(init: Mapping[str, Any]) -> list[str]:
    problems = []
    if "strategy" in init and not isinstance(init["strategy"], str):
        problems.append(f"init.strategy must be a string, got {init['strategy']!r:.80}")
    sources, weights = init.get("sources"), init.get("weights")
    if sources is not None and not _is_str_list(sources):
        problems.append(f"init.sources must be a list of strings, got {sources!r:.80}")
    if weights is not None and not (
        isinstance(weights, list) and all(_is_number(w) and math.isfinite(w) for w in weights)
    ):
        problems.append(f"init.weights must be a list of finite numbers, got {weights!r:.80}")
    elif isinstance(sources, list) and isinstance(weights, list) and len(sources) != len(weights):
        problems.append(
            f"init.sources ({len(sources)}) and init.weights ({len(weights)}) must have "
            f"one weight per source"
        )
    return problems


def meta_problems(data: Mapping[str, Any]) -> list[str]:
    """What is wrong with the fields present in a parsed ``raysoup.json`` (empty: nothing).
    Missing required fields are reported by ``CheckpointMeta.from_dict``."""
    problems = []
    for name in ("dataset", "arch"):
        if name in data and not (isinstance(data[name], str) and data[name]):
            problems.append(f"{name} must be a non-empty string, got {data[name]!r:.80}")
    if "stage" in data and data["stage"] not in CHECKPOINT_STAGES:
        problems.append(f"stage must be one of {CHECKPOINT_STAGES}, got {data['stage']!r:.80}")
    envs = data.get("envs")
    if "envs" in data and not _is_str_list(envs):
        problems.append(f"envs must be a list of strings, got {envs!r:.80}")
    if "num_classes" in data and not (_is_int(data["num_classes"]) and data["num_classes"] > 0):
        problems.append(f"num_classes must be a positive integer, got {data['num_classes']!r:.80}")
    for name in ("test_env", "trial_seed", "hparams_seed"):
        if name in data and not _is_int(data[name]):
            problems.append(f"{name} must be an integer, got {data[name]!r:.80}")
    test_env = data.get("test_env", -1)
    if _is_int(test_env) and _is_str_list(envs) and not -1 <= test_env < len(envs):
        problems.append(f"test_env must be -1 or an index into envs, got {test_env}")
    for name in ("hparams", "init", "metrics"):
        if name in data and not isinstance(data[name], dict):
            problems.append(f"{name} must be a JSON object, got {data[name]!r:.80}")
    if isinstance(data.get("init"), dict):
        problems += _init_problems(data["init"])
    if isinstance(data.get("metrics"), dict):
        bad = sorted(k for k, v in data["metrics"].items() if not isinstance(v, (int, float)))
        if bad:
            problems.append(f"metrics must be numbers; {bad[:5]} are not")
    content_hash = data.get("content_hash")
    if not (isinstance(content_hash, str) and _SHA256_HEX.fullmatch(content_hash)):
        # required on read: an empty hash would skip verifying the weights
        problems.append(
            f"content_hash must be the 64-hex-digit sha256 of the weights, got {content_hash!r:.80}"
        )
    version = data.get("format_version", KNOWN_FORMAT_VERSIONS[-1])
    if not (_is_int(version) and version in KNOWN_FORMAT_VERSIONS):
        problems.append(
            f"format_version {version!r:.80} is unknown (known: {KNOWN_FORMAT_VERSIONS})"
        )
    return problems


def check_meta_fields(data: Mapping[str, Any], source: str | Path) -> None:
    problems = meta_problems(data)
    if problems:
        raise CheckpointError(f"{source}: inconsistent metadata: {'; '.join(problems)}")


def parse_json(raw: bytes, what: str, source: str | Path) -> Any:
    """JSON from untrusted bytes: duplicate keys and pathological nesting are refused."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            duplicated = sorted({key for key in keys if keys.count(key) > 1})
            raise ValueError(f"duplicate keys {duplicated[:5]}")
        return dict(pairs)

    try:
        return json.loads(raw.decode(), object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        # JSONDecodeError is a ValueError; RecursionError: "[[[[..." nested too deep
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise CheckpointError(f"{source}: corrupt {what} JSON ({reason:.200})") from error


# ---------------------------------------------------------------- safetensors header


def header_length(first: bytes, file_size: int, source: str | Path) -> int:
    """The JSON header's length from the file's first 8 bytes, checked against the file."""
    if file_size < HEADER_LENGTH_BYTES + 2 or len(first) < HEADER_LENGTH_BYTES:
        raise CheckpointError(
            f"{source}: {file_size} bytes is too short for a safetensors file "
            f"(8-byte header length, then a JSON header)"
        )
    length = int.from_bytes(first[:HEADER_LENGTH_BYTES], "little")
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{source}: safetensors header length {length} is absurd "
            f"(expected 2..{MAX_HEADER_BYTES} bytes)"
        )
    if HEADER_LENGTH_BYTES + length > file_size:
        raise CheckpointError(
            f"{source}: safetensors header length {length} runs past the end of the "
            f"{file_size}-byte file"
        )
    return length


def _entry(name: str, spec: object, source: str | Path) -> TensorEntry:
    """One header entry, its fields typed and its byte range equal to ``dtype x shape``."""
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
        raise CheckpointError(
            f"{source}: tensor {name!r:.80} must have dtype, shape and data_offsets, "
            f"got {spec!r:.80}"
        )
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{source}: tensor {name!r:.80} has unknown dtype {dtype!r:.40}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(
            f"{source}: tensor {name!r:.80} shape must be a list of sizes >= 0, got {shape!r:.80}"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"{source}: tensor {name!r:.80} data_offsets must be [begin, end] with "
            f"0 <= begin <= end, got {offsets!r:.80}"
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise CheckpointError(
            f"{source}: tensor {name!r:.80} ({dtype}, shape {shape}) needs {bits / 8:g} bytes, "
            f"its data_offsets {offsets} hold {offsets[1] - offsets[0]}"
        )
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(entries: Mapping[str, TensorEntry], data_size: int, source: str | Path) -> None:
    """The byte ranges cover the data section exactly once (as the format requires)."""
    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise CheckpointError(
                f"{source}: tensor {name!r:.80} (bytes {entry.begin}..{entry.end}) overlaps "
                f"tensor {previous!r:.80} (ending at {position})"
            )
        if entry.begin > position:
            raise CheckpointError(
                f"{source}: bytes {position}..{entry.begin} before tensor {name!r:.80} belong to "
                f"no tensor (the data must be tiled without holes)"
            )
        position, previous = entry.end, name
    if position > data_size:
        raise CheckpointError(
            f"{source}: tensor {previous!r:.80} ends at data byte {position}, past the end of "
            f"the {data_size}-byte data section: the file is truncated or the header forged"
        )
    if position < data_size:
        raise CheckpointError(
            f"{source}: {data_size - position} bytes after the last tensor belong to no "
            f"tensor (the file size must end where the last tensor ends)"
        )


def check_safetensors_header(
    header: bytes, file_size: int, source: str | Path
) -> dict[str, TensorEntry]:
    """The tensors a safetensors ``header`` (the JSON, its length already checked by
    :func:`header_length`) describes in a file of ``file_size`` bytes."""
    parsed = parse_json(header, "safetensors header", source)
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{source}: safetensors header must be a JSON object")
    metadata = parsed.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(
            f"{source}: safetensors __metadata__ must map strings to strings, got {metadata!r:.80}"
        )
    entries = {name: _entry(name, spec, source) for name, spec in parsed.items()}
    _check_tiling(entries, file_size - HEADER_LENGTH_BYTES - len(header), source)
    return entries


def _layer_order(key: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a module path, numerically where numeric (``6`` after ``3``)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in key.split(".")[1:-1])


def last_classifier_layer(shapes: Mapping[str, Sequence[int]]) -> tuple[str, int] | None:
    """``(key, outputs)`` of the last ``classifier.*`` linear weight among tensor
    ``shapes`` (what ``num_classes`` must match), or ``None`` without one."""
    weights = {
        key: shape
        for key, shape in shapes.items()
        if key.startswith("classifier.") and key.endswith(".weight") and len(shape) == 2
    }
    if not weights:
        return None
    last = max(weights, key=_layer_order)
    return last, int(weights[last][0])


def check_classifier(
    entries: Mapping[str, TensorEntry], num_classes: int, source: str | Path
) -> None:
    """The last ``classifier.*`` linear layer has ``num_classes`` outputs (when present)."""
    found = last_classifier_layer({key: entry.shape for key, entry in entries.items()})
    if found is not None and found[1] != num_classes:
        raise CheckpointError(
            f"{source}: classifier tensor {found[0]!r} has {found[1]} outputs, the "
            f"metadata records num_classes={num_classes}"
        )


# ---------------------------------------------------------------- readers


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def read_safetensors_header(
    handle: Readable, file_size: int, source: str | Path
) -> dict[str, TensorEntry]:
    """Read and check the header of an open safetensors file (a local file or an Arrow
    stream): only ``8 + header length`` bytes are read, never the tensors."""
    first = handle.read(HEADER_LENGTH_BYTES)
    length = header_length(first, file_size, source)
    header = handle.read(length)
    if len(header) != length:
        raise CheckpointError(f"{source}: file ended inside the safetensors header")
    return check_safetensors_header(header, file_size, source)


def read_meta_bytes(path: Path) -> bytes:
    """A local ``raysoup.json``'s bytes; its size is checked before reading, and the read
    is bounded too (a device, or a file growing underneath, misreports its size)."""
    check_meta_size(path.stat().st_size, path)
    with open(path, "rb") as handle:
        raw = handle.read(MAX_META_BYTES + 1)
    check_meta_size(len(raw), path)
    return raw
