"""The single-run trainer on the built-in benchmark, through every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raysoup.data.builtin import BUILTIN_TARGET
from raysoup.io.checkpoint import CheckpointError, load_checkpoint, read_meta
from raysoup.options import OptionsError
from raysoup.training.trainer import RunSpec, train_run

TEST_ENV = 5  # rotated by 75 degrees: the hardest, the furthest from the others


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, base_checkpoint: Path) -> dict:
    """base (cached) -> LP -> two auxiliary runs: what target runs start from."""
    root = tmp_path_factory.mktemp("pipeline")
    common = {"pretrained": base_checkpoint, "device": "cpu"}
    lp = train_run(
        RunSpec(
            dataset=BUILTIN_TARGET,
            out=root / "lp",
            stage="lp",
            test_env=TEST_ENV,
            steps=150,
            **common,
        )
    )
    for name in ("AuxRotationFlip", "AuxRecolourMod5"):
        train_run(
            RunSpec(
                dataset=name, out=root / "aux" / name, stage="aux", test_env=-1, steps=60, **common
            )
        )
    return {"root": root, "lp": lp, "common": common}


def _target(pipeline: dict, out: Path, **kw) -> dict:
    values = {
        "dataset": BUILTIN_TARGET,
        "out": out,
        "test_env": TEST_ENV,
        "lp_head": pipeline["root"] / "lp",
        "aux_dir": [pipeline["root"] / "aux"],
        "steps": 200,
        "checkpoint_freq": 100,
        **pipeline["common"],
        **kw,
    }
    spec = RunSpec(**values)
    return train_run(spec)


def test_lp_trains_the_head_only(pipeline: dict, base_checkpoint: Path) -> None:
    lp_state, lp_meta = load_checkpoint(pipeline["root"] / "lp")
    base_state, _ = load_checkpoint(base_checkpoint)
    for key, value in lp_state.items():
        if key.startswith("featurizer."):
            assert torch.equal(value, base_state[key]), key  # frozen, BatchNorm stats included
    assert lp_meta.stage == "lp" and lp_meta.test_env == TEST_ENV
    assert pipeline["lp"]["id_val_acc"] > 0.2  # well above the 0.1 of chance


def test_target_run_learns_and_ood_is_harder(pipeline: dict, tmp_path: Path) -> None:
    result = _target(pipeline, tmp_path / "t")
    assert result["id_val_acc"] > 0.6, result  # chance is 0.1
    assert result["test_acc"] < result["id_val_acc"] - 0.05
    for i in range(6):
        assert 0 <= result[f"env{i}_in_acc"] <= 1 and 0 <= result[f"env{i}_out_acc"] <= 1
    meta = read_meta(tmp_path / "t")
    assert (
        meta.init["strategy"] == "pretrained" and meta.metrics["id_val_acc"] == result["id_val_acc"]
    )


def test_same_spec_same_checkpoint_on_cpu(pipeline: dict, tmp_path: Path) -> None:
    a = _target(pipeline, tmp_path / "a", steps=60, hparams_seed=2)
    b = _target(pipeline, tmp_path / "b", steps=60, hparams_seed=2)
    assert a["content_hash"] == b["content_hash"]
    c = _target(pipeline, tmp_path / "c", steps=60, hparams_seed=2, trial_seed=1, lp_head=None)
    assert c["content_hash"] != a["content_hash"]


def test_ratatouille_and_fusing_inits(pipeline: dict, tmp_path: Path) -> None:
    aux = pipeline["root"] / "aux"
    rat = _target(pipeline, tmp_path / "r", init="ratatouille", hparams_seed=1, steps=60)
    # k = 1 % 3 = 1 -> first aux dataset by name, run 1 % 1 = 0
    assert rat["init_sources"] == [str(aux / "AuxRecolourMod5")]
    fus = _target(
        pipeline, tmp_path / "f", init="fusing", hparams_seed=1, steps=60, fusing_range=4.0
    )
    assert fus["init_sources"] == [
        "pretrained",
        str(aux / "AuxRecolourMod5"),
        str(aux / "AuxRotationFlip"),
    ]
    assert np.isclose(sum(fus["init_weights"]), 1.0) and len(set(fus["init_weights"])) == 3
    assert read_meta(tmp_path / "f").init["weights"] == fus["init_weights"]
    uniform = _target(
        pipeline, tmp_path / "u", init="fusing", hparams_seed=1, steps=1, fusing_range=0.0
    )
    assert np.allclose(uniform["init_weights"], 1 / 3)


def test_leakage_guard_in_the_trainer(pipeline: dict, tmp_path: Path) -> None:
    leak = tmp_path / "pool"
    train_run(
        RunSpec(
            dataset=BUILTIN_TARGET,
            out=leak / "target_aux",
            stage="aux",
            test_env=-1,
            steps=5,
            **pipeline["common"],
        )
    )
    spec = RunSpec(
        dataset=BUILTIN_TARGET,
        out=tmp_path / "x",
        test_env=TEST_ENV,
        init="ratatouille",
        aux_dir=[leak],
        steps=5,
        **pipeline["common"],
    )
    with (
        pytest.warns(UserWarning, match="leakage guard"),
        pytest.raises(CheckpointError, match="no usable auxiliary"),
    ):
        train_run(spec)


def test_lp_head_from_other_splits_is_refused(pipeline: dict, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="LP head was trained for"):
        _target(pipeline, tmp_path / "x", trial_seed=3, steps=5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "Nope"}, "unknown dataset 'Nope'"),
        ({"test_env": 6}, "test_env=6 is out of range"),
        ({"init": "fusing"}, "needs auxiliary checkpoints"),
        ({"steps": 0}, "steps=0"),
        ({"stage": "aux"}, "use test_env=-1"),
        ({"fusing_range": -1.0}, "fusing_range=-1.0"),
        ({"holdout_fraction": 1.0}, "holdout_fraction=1.0"),
        ({"lp_head": "/nonexistent"}, "not a checkpoint directory"),
    ],
)
def test_bad_specs_are_rejected_before_any_work(
    tmp_path: Path, changes: dict, message: str
) -> None:
    values = {"dataset": BUILTIN_TARGET, "out": tmp_path / "o", "test_env": 0, **changes}
    with pytest.raises((OptionsError, ValueError), match=message):
        RunSpec(**values).validate()
    assert not (tmp_path / "o").exists()


def test_cli_train_prints_one_json_object(base_checkpoint: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "raysoup.cli",
        "train",
        "--dataset",
        BUILTIN_TARGET,
        "--test-env",
        "0",
        "--trial-seed",
        "0",
        "--hparams-seed",
        "0",
        "--init",
        "pretrained",
        "--steps",
        "40",
        "--pretrained",
        str(base_checkpoint),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout)
    for key in ("id_val_acc", "test_acc", "env0_in_acc", "env5_out_acc", "checkpoint"):
        assert key in result
    assert "step     40" in done.stderr  # progress lines go to stderr
    bad = subprocess.run([*cmd[:5], "Nope", *cmd[6:]], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown dataset 'Nope'" in bad.stderr


def test_domainbed_imagefolder_run_with_resnet(tmp_path: Path) -> None:
    """The on-disk path end to end: PACS layout, ResNet-18, explicit ImageNet weights file."""
    import torchvision
    from PIL import Image

    from raysoup.data.domainbed import PACS

    for e, env in enumerate(PACS.ENV_FOLDERS):
        for c in range(7):
            folder = tmp_path / "data" / "PACS" / env / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (40, 30), (30 * c, 60 * e, 10 * i)).save(folder / f"{i}.jpg")
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    result = train_run(
        RunSpec(
            dataset="PACS",
            data_dir=tmp_path / "data",
            out=tmp_path / "ck",
            test_env=3,
            arch="resnet18",
            pretrained_weights=weights,
            steps=2,
            hparams={"batch_size": 2},
            device="cpu",
        )
    )
    assert result["stage"] == "target" and 0 <= result["test_acc"] <= 1
    meta = read_meta(tmp_path / "ck")
    assert meta.arch == "resnet18" and meta.envs == ["A", "C", "P", "S"] and meta.num_classes == 7
    assert meta.init["pretrained_from"] == str(weights)


def test_arch_resolution_follows_the_resnet18_hparam(tmp_path: Path) -> None:
    """The network built and the arch recorded in the checkpoint come from one place."""
    from raysoup.data.domainbed import PACS
    from raysoup.training.trainer import resolve_arch

    spec = RunSpec(dataset="PACS", out=tmp_path / "o", data_dir=tmp_path)
    assert resolve_arch(spec, PACS, {"resnet18": False}) == "resnet50"
    assert resolve_arch(spec, PACS, {"resnet18": True}) == "resnet18"
    spec.arch = "cnn"
    assert resolve_arch(spec, PACS, {"resnet18": True}) == "cnn"
