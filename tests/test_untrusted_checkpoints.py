"""Checkpoints from an auxiliary pool are untrusted input: real checkpoints, written by
``save_checkpoint``, are tampered with the way a stranger could, and each is refused
with a ``CheckpointError`` naming the file and the problem, before anything expensive.

A forger can recompute ``content_hash``, so the tampered weights here get a matching
hash (``_forge``): the header checks, not the hash, must refuse them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import minirotated

from raysoup.io import checkpoint as ckpt
from raysoup.io import storage
from raysoup.io.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    file_sha256,
    import_state_dict,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from raysoup.io.pool import source_inside
from raysoup.io.validate import MAX_META_BYTES
from raysoup.models.foundation import foundation_dir
from raysoup.sweep.plan import check_aux_pool, checkpoint_path
from raysoup.sweep.record import record_config
from raysoup.training import inits


def _state() -> dict[str, torch.Tensor]:
    return {
        "featurizer.conv.weight": torch.arange(6, dtype=torch.float32).reshape(3, 2),
        "featurizer.bn.num_batches_tracked": torch.tensor(7),
        "classifier.weight": torch.ones(4, 2),
        "classifier.bias": torch.zeros(4),
    }


def _save(path: Path, dataset: str = "OtherSet", **fields: Any) -> CheckpointMeta:
    meta = CheckpointMeta(dataset=dataset, envs=["a", "b"], arch="x", num_classes=4, stage="aux")
    for name, value in fields.items():
        setattr(meta, name, value)
    return save_checkpoint(path, _state(), meta)


def _edit_meta(directory: Path, **changes: Any) -> Path:
    path = directory / META_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def _split(weights: Path) -> tuple[dict[str, Any], bytes]:
    """(header, data section) of a safetensors file."""
    raw = weights.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _forge(directory: Path, raw: bytes) -> Path:
    """Replace the weights with ``raw`` and record its hash, as a forger would."""
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(raw)
    _edit_meta(directory, content_hash=file_sha256(weights))
    return weights


def _where(path: Path) -> str:
    return re.escape(str(path)) + ": "


def _forbid_expensive_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, fail the test if the weights are hashed or handed to safetensors."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("expensive work started before the checkpoint was refused")

    monkeypatch.setattr(ckpt, "file_sha256", forbidden)
    monkeypatch.setattr(ckpt, "load_file", forbidden)


# ---------------------------------------------------------------- our own checkpoints


def test_a_normal_checkpoint_round_trips(tmp_path: Path) -> None:
    saved = _save(tmp_path / "pool" / "ck")
    state, meta = load_checkpoint(tmp_path / "pool" / "ck", reference=_state())
    for key, tensor in _state().items():
        assert torch.equal(state[key], tensor) and state[key].dtype == tensor.dtype
    assert meta == saved
    assert import_state_dict(tmp_path / "pool" / "ck" / WEIGHTS_FILE).keys() == state.keys()
    # as a pool: listed, and its featurizer loaded
    pool = inits.discover_aux_pool([tmp_path / "pool"], "Target")
    assert pool.as_lists() == [[str(tmp_path / "pool" / "ck")]]
    reference = {"conv.weight": torch.zeros(3, 2), "bn.num_batches_tracked": torch.tensor(0)}
    featurizer = inits.load_aux_featurizer(tmp_path / "pool" / "ck", "Target", reference)
    assert torch.equal(featurizer["conv.weight"], _state()["featurizer.conv.weight"])
    # the foundation shipped in the package passes every check too
    _, foundation = load_checkpoint(foundation_dir())
    assert foundation.num_classes == 69


# ---------------------------------------------------------------- metadata


def test_oversized_metadata_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path / "ck")
    meta = tmp_path / "ck" / META_FILE
    _forbid_expensive_work(monkeypatch)
    with open(meta, "r+b") as handle:  # sparse: 8 GiB that reading would have to allocate
        handle.truncate(8 << 30)
    with pytest.raises(CheckpointError, match=_where(meta) + r"metadata is 8589934592 bytes"):
        read_meta(tmp_path / "ck")
    # valid JSON just over the bound: the size alone refuses it
    meta.write_text(json.dumps({"pad": "x" * MAX_META_BYTES}))
    with pytest.raises(CheckpointError, match=_where(meta) + r"metadata is \d+ bytes, more than"):
        load_checkpoint(tmp_path / "ck")


def test_pathological_json_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "ck")
    meta = tmp_path / "ck" / META_FILE
    good = meta.read_text()
    meta.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=_where(meta) + "corrupt metadata JSON .*nested"):
        read_meta(tmp_path / "ck")
    meta.write_text(good.rstrip()[:-1] + ', "dataset": "Other"}')
    with pytest.raises(CheckpointError, match=_where(meta) + r".*duplicate keys \['dataset'\]"):
        read_meta(tmp_path / "ck")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"num_classes": -3}, r"num_classes must be a positive integer, got -3"),
        ({"num_classes": "4"}, r"num_classes must be a positive integer, got '4'"),
        ({"num_classes": True}, r"num_classes must be a positive integer, got True"),
        ({"envs": "ab"}, r"envs must be a list of strings, got 'ab'"),
        ({"envs": [1, 2]}, r"envs must be a list of strings, got \[1, 2\]"),
        ({"dataset": 7}, r"dataset must be a non-empty string, got 7"),
        ({"stage": "evil"}, r"stage must be one of .*, got 'evil'"),
        ({"test_env": 2}, r"test_env must be -1 or an index into envs, got 2"),
        ({"trial_seed": 0.5}, r"trial_seed must be an integer, got 0\.5"),
        ({"content_hash": "abc"}, r"content_hash must be the 64-hex-digit sha256.*'abc'"),
        ({"content_hash": ""}, r"content_hash must be the 64-hex-digit sha256.*''"),
        ({"hparams": [1]}, r"hparams must be a JSON object, got \[1\]"),
        ({"init": "pretrained"}, r"init must be a JSON object, got 'pretrained'"),
        ({"metrics": [0.5]}, r"metrics must be a JSON object, got \[0\.5\]"),
        ({"metrics": {"id_val_acc": "high"}}, r"metrics must be numbers; \['id_val_acc'\]"),
        ({"format_version": 99}, r"format_version 99 is unknown"),
        (
            {"init": {"sources": ["pretrained", "a"], "weights": [1.0]}},
            r"init\.sources \(2\) and init\.weights \(1\) must have one weight per source",
        ),
        ({"init": {"sources": "pretrained"}}, r"init\.sources must be a list of strings"),
        ({"init": {"weights": [float("nan")]}}, r"init\.weights must be a list of finite"),
    ],
)
def test_inconsistent_metadata_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], problem: str
) -> None:
    _save(tmp_path / "ck")
    meta = _edit_meta(tmp_path / "ck", **changes)
    _forbid_expensive_work(monkeypatch)
    expected = _where(meta) + "inconsistent metadata: .*" + problem
    with pytest.raises(CheckpointError, match=expected):
        read_meta(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=expected):  # the pool refuses it, not skips it
        inits.discover_aux_pool([tmp_path], "Target")


# ---------------------------------------------------------------- safetensors header


def _shape_grows(header: dict[str, Any], data: bytes) -> bytes:
    header["featurizer.conv.weight"]["shape"] = [3, 3]
    return _join(header, data)


def _dtype_shrinks(header: dict[str, Any], data: bytes) -> bytes:
    header["featurizer.conv.weight"]["dtype"] = "F16"
    return _join(header, data)


# save_file lays the data out as: num_batches_tracked [0, 8], classifier.bias [8, 24],
# classifier.weight [24, 56], featurizer.conv.weight [56, 80].
LAST = "featurizer.conv.weight"


def _overlap(header: dict[str, Any], data: bytes) -> bytes:
    header["classifier.bias"]["data_offsets"] = [0, 16]  # onto num_batches_tracked
    return _join(header, data)


def _hole(header: dict[str, Any], data: bytes) -> bytes:
    header[LAST]["data_offsets"] = [64, 88]  # 8 bytes later, the file 8 bytes longer
    return _join(header, data + b"\0" * 8)


def _out_of_bounds(header: dict[str, Any], data: bytes) -> bytes:
    header[LAST].update(dtype="U8", shape=[32], data_offsets=[56, 88])  # consistent, too long
    return _join(header, data)


def _unknown_dtype(header: dict[str, Any], data: bytes) -> bytes:
    header["classifier.weight"]["dtype"] = "Q8"
    return _join(header, data)


def _negative_shape(header: dict[str, Any], data: bytes) -> bytes:
    header["classifier.weight"]["shape"] = [-4, -2]
    return _join(header, data)


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda h, d: _join(h, d[:-4]), r"ends at data byte \d+, past the end of the .* truncated"),
        (lambda h, d: _join(h, d + b"\0" * 16), r"16 bytes after the last tensor belong to no"),
        (_shape_grows, r"'featurizer\.conv\.weight' \(F32, shape \[3, 3\]\) needs 36 bytes, .* 24"),
        (_dtype_shrinks, r"'featurizer\.conv\.weight' \(F16, shape \[3, 2\]\) needs 12 bytes"),
        (
            _overlap,
            r"'classifier\.bias' \(bytes 0\.\.16\) overlaps tensor "
            r"'featurizer\.bn\.num_batches_tracked' \(ending at 8\)",
        ),
        (_hole, r"bytes 56\.\.64 before tensor 'featurizer\.conv\.weight' belong to no tensor"),
        (
            _out_of_bounds,
            r"'featurizer\.conv\.weight' ends at data byte 88, past the end of the 80",
        ),
        (_unknown_dtype, r"tensor 'classifier\.weight' has unknown dtype 'Q8'"),
        (_negative_shape, r"'classifier\.weight' shape must be a list of sizes >= 0"),
        (lambda h, d: (1 << 60).to_bytes(8, "little") + d, r"header length \d+ is absurd"),
        (lambda h, d: (5000).to_bytes(8, "little") + d[:100], r"header length 5000 runs past"),
        (lambda h, d: b"\1\0\0", r"3 bytes is too short for a safetensors file"),
        (lambda h, d: (4).to_bytes(8, "little") + b"[1] " + d, r"header must be a JSON object"),
        (lambda h, d: (3).to_bytes(8, "little") + b"{x}" + d, r"corrupt safetensors header JSON"),
    ],
)
def test_forged_safetensors_are_refused_before_hashing_or_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tamper: Any, problem: str
) -> None:
    _save(tmp_path / "ck")
    header, data = _split(tmp_path / "ck" / WEIGHTS_FILE)
    weights = _forge(tmp_path / "ck", tamper(header, data))
    _forbid_expensive_work(monkeypatch)
    for verify_hash in (True, False):
        with pytest.raises(CheckpointError, match=_where(weights) + ".*" + problem):
            load_checkpoint(tmp_path / "ck", verify_hash=verify_hash)
    with pytest.raises(CheckpointError, match=_where(weights) + ".*" + problem):
        import_state_dict(weights)


def test_classifier_must_match_num_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "ck")
    _edit_meta(tmp_path / "ck", num_classes=7)
    weights = tmp_path / "ck" / WEIGHTS_FILE
    with (
        monkeypatch.context() as patch,
        pytest.raises(
            CheckpointError,
            match=_where(weights) + r"classifier tensor 'classifier\.weight' has 4 outputs, the "
            r"metadata records num_classes=7",
        ),
    ):
        _forbid_expensive_work(patch)
        load_checkpoint(tmp_path / "ck")
    # a nonlinear head: its last layer (numeric order: 10 after 3) counts
    state = {
        "classifier.3.weight": torch.zeros(8, 2),
        "classifier.10.weight": torch.zeros(5, 8),
    }
    meta = CheckpointMeta("D", ["a"], "x", num_classes=5)
    save_checkpoint(tmp_path / "mlp", state, meta)
    load_checkpoint(tmp_path / "mlp")
    _edit_meta(tmp_path / "mlp", num_classes=8)
    with pytest.raises(CheckpointError, match=r"'classifier\.10\.weight' has 5 outputs"):
        load_checkpoint(tmp_path / "mlp")


# ---------------------------------------------------------------- pools


def test_symlinks_leaving_the_pool_are_refused(tmp_path: Path) -> None:
    outside, pool = tmp_path / "outside", tmp_path / "pool"
    _save(outside / "ck")
    _save(pool / "real")
    inits.discover_aux_pool([pool], "Target")
    # a link that stays inside the pool is fine
    (pool / "alias").symlink_to(pool / "real")
    assert inits.discover_aux_pool([pool], "Target").as_lists() == [[str(pool / "real")]]
    # a checkpoint directory linked from outside: refused, not silently skipped
    (pool / "stranger").symlink_to(outside / "ck", target_is_directory=True)
    with pytest.raises(
        CheckpointError,
        match=_where(pool / "stranger") + f"symlink resolves to {re.escape(str(outside))}.*"
        "outside the auxiliary pool",
    ):
        inits.discover_aux_pool([pool], "Target")
    (pool / "stranger").unlink()
    # a weights file linked from outside
    (pool / "real" / WEIGHTS_FILE).unlink()
    (pool / "real" / WEIGHTS_FILE).symlink_to(outside / "ck" / WEIGHTS_FILE)
    with pytest.raises(
        CheckpointError, match=_where(pool / "real" / WEIGHTS_FILE) + "symlink resolves to"
    ):
        inits.discover_aux_pool([pool], "Target")


def test_a_pool_given_as_a_file_uri_is_checked_as_its_folder(tmp_path: Path) -> None:
    outside, pool = tmp_path / "outside", tmp_path / "pool"
    _save(outside / "ck")
    sources = ["pretrained", str(pool / "other")]
    _save(pool / "real", init={"strategy": "fusing", "sources": sources, "weights": [0.5] * 2})
    assert inits.discover_aux_pool([pool.as_uri()], "Target").as_lists() == [[str(pool / "real")]]
    (pool / "stranger").symlink_to(outside / "ck", target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"symlink resolves to .*outside the auxiliary pool"):
        inits.discover_aux_pool([pool.as_uri()], "Target")


@pytest.mark.parametrize("source", ["/etc/passwd", "../outside/ck", "s3://elsewhere/ck"])
def test_metadata_paths_leaving_the_pool_are_refused(tmp_path: Path, source: str) -> None:
    pool = tmp_path / "pool"
    _save(pool / "ck", init={"strategy": "ratatouille", "sources": [source], "weights": [1.0]})
    with pytest.raises(
        CheckpointError,
        match=_where(pool / "ck" / META_FILE)
        + re.escape(f"init.sources [{source!r}] point outside the auxiliary pool {pool}"),
    ):
        inits.discover_aux_pool([pool], "Target")


def test_metadata_paths_inside_the_pool_are_accepted(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    sources = ["pretrained", str(pool / "other"), "sub/../ck"]
    _save(pool / "ck", init={"strategy": "fusing", "sources": sources, "weights": [0.5] * 3})
    assert inits.discover_aux_pool([pool], "Target").as_lists() == [[str(pool / "ck")]]


@pytest.mark.parametrize(
    ("source", "inside"),
    [
        ("s3://bucket/pool/aux/x", True),
        ("pretrained", True),
        ("s3://bucket/pool/../other", False),
        ("s3://bucket/poolside/x", False),
        ("gs://bucket/pool/x", False),
        ("/etc/passwd", False),
        ("../x", False),
    ],
)
def test_source_inside_a_remote_pool(source: str, inside: bool) -> None:
    assert source_inside(source, "s3://bucket/pool?endpoint_override=h:9000") is inside


def test_planning_refuses_a_borrowed_pool_before_any_trial(tmp_path: Path) -> None:
    pool_root = tmp_path / "pool"
    pool = minirotated(name="pool")
    record_config(pool_root, pool)
    aux = pool.aux_datasets[0]
    borrowing = minirotated(aux_pool=str(pool_root), aux_datasets=[aux], aux_n_hparams=1)
    ck = checkpoint_path(pool_root, "aux", f"aux-{aux}-h0")
    _save(ck, dataset=aux)
    assert check_aux_pool(borrowing) == [ck]
    # forged weights (hash recomputed): refused at planning
    header, data = _split(ck / WEIGHTS_FILE)
    weights = _forge(ck, _join(header, data + b"\0" * 8))
    with pytest.raises(CheckpointError, match=_where(weights) + "8 bytes after the last tensor"):
        check_aux_pool(borrowing)
    # the aux run linked in from outside the pool
    _save(tmp_path / "outside", dataset=aux)
    os.rename(ck, tmp_path / "forged")
    ck.symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(CheckpointError, match=_where(ck) + "symlink resolves to .*outside"):
        check_aux_pool(borrowing)


def test_a_forged_remote_checkpoint_is_refused_before_download(s3_bucket, tmp_path: Path) -> None:
    _save(tmp_path / "ck")
    location = f"{s3_bucket}/pool/ck"
    header, data = _split(tmp_path / "ck" / WEIGHTS_FILE)
    _forge(tmp_path / "ck", _join(header, data + b"\0" * 8))
    storage.publish_checkpoint(tmp_path / "ck", location)
    cache = tmp_path / "cache"
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"{location}/{WEIGHTS_FILE}: ") + "8 bytes after the last tensor",
    ):
        storage.local_checkpoint(location, cache_dir=cache)
    assert not any((cache / "storage").iterdir())  # nothing was downloaded
    # an oversized remote marker is refused by its size, unread
    storage.write_bytes_atomic(f"{location}/{META_FILE}", b" " * (MAX_META_BYTES + 1))
    with pytest.raises(CheckpointError, match=re.escape(f"{location}/{META_FILE}: metadata is")):
        storage.read_meta(location)
