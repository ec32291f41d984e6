from __future__ import annotations

from pathlib import Path

import pytest

from raysoup.options import OptionsError
from raysoup.sweep.config import SweepConfig, load_config
from raysoup.sweep.plan import checkpoint_path, plan_sweep
from raysoup.sweep.runner import record_config
from raysoup.training.trainer import RunSpec


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "test_envs: [6]\n",
            r"test_envs: 6 is out of range for MiniRotatedMNIST .*expected 0\.\.5",
        ),
        ("aux_datasets: [AuxRotationFlip, MiniRotatedMNIST]\n", "contains the target dataset"),
        ("n_hparams: 0\n", "n_hparams=0"),
        ("test_envs: []\n", "test_envs is empty"),
        ("inits: []\n", "inits is empty"),
        ("inits: [pretrained, soup]\n", "unknown init 'soup'"),
        ("learning_rate: 0.1\n", r"unknown option\(s\) \['learning_rate'\]"),
        ("n_hparams: three\n", "'n_hparams'='three': expected an integer"),
        ("trial_seeds: 0\n", "expected a list"),
        ("dataset: PACS\ntest_envs: [0]\ninits: [pretrained]\n", "read from disk: set data_dir"),
        ("aux_datasets: []\n", "need auxiliary datasets"),
        ("gpus_per_trial: -1\n", "gpus_per_trial=-1"),
        ("soup_accept: gte\n", r"expected one of \['ge', 'gt'\]"),
        ("[1, 2]\n", "mapping of options"),
        ("hparams: {lr: big}\n", r"hparams: lr='big': expected a number"),
        ("hparams: {batch_size: 0}\n", r"batch_size=0: expected a positive integer"),
        ("hparams: {momentum: 0.9}\n", r"unknown hyperparameter\(s\) \['momentum'\]"),
        ("dataset: null\naux_datasets: []\n", "auxiliary pool only.*aux_datasets is empty"),
        ("dataset: null\naux_datasets: [PACS]\n", "'PACS' is read from disk: set data_dir"),
        (
            "dataset: PACS\ndata_dir: /d\ntest_envs: [0]\naux_datasets: [AuxRotationFlip]\n",
            "'AuxRotationFlip' trains a cnn but target 'PACS' a resnet50",
        ),
        ("aux_pool: /no/such/pool\n", "aux_pool='/no/such/pool': no such directory"),
        ("test_envs: [1\n", "not valid YAML"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(tmp_path, yaml_text, message) -> None:
    with pytest.raises(OptionsError, match=message):
        load_config(_write(tmp_path, yaml_text))


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(OptionsError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_fingerprint_changes_with_what_is_computed(tmp_path) -> None:
    a = load_config(None)
    assert a.fingerprint() == load_config(None).fingerprint()
    assert a.fingerprint() == load_config(None, max_concurrent_trials=2).fingerprint()
    assert a.fingerprint() != load_config(None, n_hparams=4).fingerprint()
    assert (
        load_config(_write(tmp_path, "n_hparams: 4\n")).fingerprint()
        == load_config(None, n_hparams=4).fingerprint()
    )


def test_plan_covers_every_stage_with_stable_keys(tmp_path) -> None:
    config = load_config(None, n_hparams=2, trial_seeds=[0, 1], test_envs=[0, 5])
    plan = plan_sweep(config, tmp_path)
    assert list(plan) == ["base", "lp", "aux", "target"]
    assert len(plan["lp"]) == 4 and len(plan["aux"]) == 3
    assert len(plan["target"]) == 2 * 2 * 2 * 3
    keys = [r.key for runs in plan.values() for r in runs]
    assert len(keys) == len(set(keys))
    assert plan == plan_sweep(config, tmp_path)
    for runs in plan.values():
        for run in runs:
            RunSpec(**run.spec)  # every planned spec is a valid RunSpec
    target = plan["target"][-1].spec
    assert target["lp_head"] == tmp_path / "checkpoints/lp/lp-MiniRotatedMNIST-e5-s1"
    pretrained_only = plan_sweep(load_config(None, inits=["pretrained"]), tmp_path)
    assert "aux" not in pretrained_only


def test_a_pool_alone_plans_base_and_aux_only(tmp_path) -> None:
    pool = load_config(_write(tmp_path, "dataset: null\naux_n_hparams: 2\n"))
    plan = plan_sweep(pool, tmp_path)
    assert list(plan) == ["base", "aux"] and len(plan["aux"]) == 3 * 2


def _fake_checkpoint(path: Path) -> None:
    path.mkdir(parents=True)
    for name in ("model.safetensors", "raysoup.json"):
        (path / name).write_text("")  # planning only looks at whether they exist


def test_a_target_sweep_borrows_only_its_aux_datasets_from_a_pool(tmp_path) -> None:
    pool_root = tmp_path / "pool"
    pool = load_config(_write(tmp_path, "name: pool\ndataset: null\n"))
    record_config(pool_root, pool)
    for aux in pool.aux_datasets:
        _fake_checkpoint(checkpoint_path(pool_root, "aux", f"aux-{aux}-h0"))
    _fake_checkpoint(checkpoint_path(pool_root, "base", "base"))
    borrowing = load_config(None, aux_pool=str(pool_root), aux_datasets=pool.aux_datasets[:2])
    plan = plan_sweep(borrowing, tmp_path / "target")
    assert list(plan) == ["lp", "target"]  # the pool's base and aux runs are reused
    ratatouille = next(r for r in plan["target"] if r.spec["init"] == "ratatouille").spec
    assert ratatouille["aux_dir"] == [
        checkpoint_path(pool_root, "aux", f"aux-{aux}-h0") for aux in pool.aux_datasets[:2]
    ]
    assert ratatouille["pretrained"] == checkpoint_path(pool_root, "base", "base")
    with pytest.raises(OptionsError, match=r"lacks auxiliary run\(s\) \['aux-AuxRotationFlip-h1'"):
        plan_sweep(load_config(None, aux_pool=str(pool_root), aux_n_hparams=2), tmp_path)
    other_arch = SweepConfig(aux_pool=pool_root, arch="resnet18").validate()
    with pytest.raises(
        OptionsError, match="trained with arch=None, this sweep has arch='resnet18'"
    ):
        plan_sweep(other_arch, tmp_path)
