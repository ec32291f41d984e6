from __future__ import annotations

import os
import pickle

import pytest
import torch

from raysoup.io.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    import_state_dict,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from raysoup.models.networks import build_network


def _meta() -> CheckpointMeta:
    return CheckpointMeta(
        dataset="D", envs=["a", "b"], arch="cnn", num_classes=10, hparams={"lr": 1e-3}
    )


def test_round_trip_is_bit_exact(tmp_path) -> None:
    torch.manual_seed(0)
    state = dict(build_network("cnn", 10).state_dict())
    state["extra.bf16"] = torch.randn(5).to(torch.bfloat16)
    state["extra.half"] = torch.randn(5).half()
    state["extra.int"] = torch.arange(4)
    saved = save_checkpoint(tmp_path / "ck", state, _meta())
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor), key
    assert meta.content_hash == saved.content_hash and len(meta.content_hash) == 64
    assert meta.hparams == {"lr": 1e-3} and meta.envs == ["a", "b"]
    # saving the same tensors again is idempotent: same bytes, same hash
    again = save_checkpoint(tmp_path / "ck", state, _meta())
    assert again.content_hash == saved.content_hash
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary leftovers


def test_mismatch_names_file_and_tensor(tmp_path) -> None:
    state = dict(build_network("cnn", 10).state_dict())
    save_checkpoint(tmp_path / "ck", state, _meta())
    other = build_network("cnn", 7).state_dict()
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*'classifier\.weight' has shape \(10, 64\)"
    ):
        load_checkpoint(tmp_path / "ck", reference=other)
    fewer = {k: v for k, v in state.items() if k != "classifier.bias"}
    save_checkpoint(tmp_path / "ck2", fewer, _meta())
    with pytest.raises(
        CheckpointError,
        match=r"ck2/model\.safetensors: keys do not match.*missing \['classifier\.bias'\]",
    ):
        load_checkpoint(tmp_path / "ck2", reference=state)


def test_truncated_and_corrupt_files(tmp_path) -> None:
    state = build_network("cnn", 10).state_dict()
    save_checkpoint(tmp_path / "ck", state, _meta())
    weights = tmp_path / "ck" / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    # the header check sees the truncation before anything is hashed or loaded
    for verify_hash in (True, False):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: .* file is truncated"):
            load_checkpoint(tmp_path / "ck", verify_hash=verify_hash)
    # a single flipped byte in the tensor data is caught by the hash
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="content hash"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt metadata JSON"):
        read_meta(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a raysoup checkpoint"):
        read_meta(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_import_refuses_pickled_code(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": _Evil()}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        import_state_dict(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    torch.save({"model_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pkl")
    assert torch.equal(import_state_dict(tmp_path / "ok.pkl")["w"], torch.ones(2))
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported weights file"):
        import_state_dict(tmp_path / "weights.npz")
