"""Sweeps on Ray with timm featurizers: a convnet with a foreign auxiliary pool (``pool
add``, the leakage guard, undeclared data marked), resumed after a lost checkpoint; and a
ViT. Weights are generated here with random init (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import local_ray_with_cache, minirotated
from safetensors.torch import save_file

from raysoup.io.checkpoint import read_meta
from raysoup.models.foreign import pool_add
from raysoup.results import load_results, sweep_table
from raysoup.soup.evaluator import DataKey, GroupData, SoupEvaluator
from raysoup.sweep.plan import plan_sweep
from raysoup.sweep.runner import run_sweep
from raysoup.training.inits import LeakageError

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.slow

SMALL = {  # a few updates per run: the machinery, not the accuracy, is under test
    "steps": 10,
    "lp_stage_steps": 5,
    "checkpoint_freq": 5,
    "image_size": 32,
    "aux_datasets": [],
}


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    yield from local_ray_with_cache(tmp_path_factory)


def _published(name: str, path: Path, seed: int, noise: float = 0.0, base: Path | None = None):
    """A timm state dict with its ImageNet-sized head, as a published checkpoint has one;
    ``base`` + noise: someone's fine-tuning of it."""
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    if base is None:
        state = timm.create_model(name, num_classes=1000).state_dict()
    else:
        state = load_file(base)
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: (v + noise * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v)
        for k, v in state.items()
    }
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _soup_checkpoint_scores(row) -> float:
    meta = read_meta(row.checkpoint)
    from raysoup.io.checkpoint import load_checkpoint

    state, _ = load_checkpoint(row.checkpoint)
    evaluator = SoupEvaluator(GroupData(DataKey.of(meta), None, 0.2), meta, torch.device("cpu"))
    return evaluator.test_acc(state)


def test_timm_sweep_with_a_foreign_pool_soups_and_resumes(local_ray, tmp_path: Path) -> None:
    weights = _published("test_resnet", tmp_path / "test_resnet.safetensors", seed=0)
    pool = tmp_path / "pool"
    for seed, dataset in ((1, "AuxRotationFlip"), (2, "AuxRecolourMod5"), (3, "MiniRotatedMNIST")):
        tuned = _published("test_resnet", tmp_path / f"ft{seed}.safetensors", seed, 0.02, weights)
        pool_add(pool, tuned, arch="timm:test_resnet", dataset=dataset)
    tuned = _published("test_resnet", tmp_path / "ft4.safetensors", 4, 0.02, weights)
    undeclared = pool_add(pool, tuned, arch="timm:test_resnet", dataset=None, undeclared=True)

    config = minirotated(
        name="timm",
        arch="timm:test_resnet",
        pretrained_weights=weights,
        inits=["pretrained", "ratatouille", "fusing"],
        aux_dirs=[str(pool)],
        n_hparams=4,
        **SMALL,
    )
    with pytest.raises(LeakageError, match="undeclared"):  # before any trial starts
        plan_sweep(config, tmp_path / "timm")
    config.allow_undeclared_aux = True
    root = run_sweep(config, tmp_path)

    results = load_results(root)
    trials = results["trials"].set_index("trial_id")
    targets = trials[trials.stage == "target"]
    assert len(targets) == 12 and (targets.status == "done").all()
    assert "base" not in set(trials.stage)  # timm: no built-in base stage
    sources = [s for row in targets.init_sources for s in row]
    assert not [s for s in sources if "MiniRotatedMNIST-" in s]  # the leakage guard
    fusing = targets[targets.init == "fusing"]
    assert all(len(s) == 4 for s in fusing.init_sources)  # pretrained + 3 aux "datasets"
    marked = targets[targets.undeclared_sources > 0]
    assert len(marked) and all(str(undeclared.checkpoint) in s for s in marked.init_sources)
    table = sweep_table(results)
    assert "fusing*" in table and "undeclared" in table
    meta = read_meta(targets.checkpoint.iloc[0])
    assert meta.arch == "timm:test_resnet" and meta.hparams["image_size"] == 32
    assert meta.hparams["preprocess"]["size"] == 32

    soups = results["soups"]
    assert set(soups.method) >= {"erm", "uniform", "greedy"}
    assert set(soups.init) == {"pretrained", "ratatouille", "fusing"}
    greedy = soups[(soups.method == "greedy") & (soups.init == "fusing")].iloc[0]
    assert _soup_checkpoint_scores(greedy) == pytest.approx(greedy.test_acc, abs=0)

    # Resume: a lost target checkpoint is retrained (the same bits), nothing else is.
    lost = targets[targets.init == "ratatouille"].iloc[1]
    hashes = dict(zip(targets.index, targets.content_hash, strict=True))
    import shutil

    shutil.rmtree(lost.checkpoint)
    run_sweep(config, tmp_path)
    again = load_results(root)
    retrained = again["trials"].set_index("trial_id").loc[targets.index]
    assert dict(zip(retrained.index, retrained.content_hash, strict=True)) == hashes
    key = ["method", "init", "trial_seed"]
    before = soups.sort_values(key)[[*key, "ingredients", "test_acc"]].reset_index(drop=True)
    after = again["soups"].sort_values(key)[[*key, "ingredients", "test_acc"]]
    assert before.astype(str).equals(after.reset_index(drop=True).astype(str))


def test_timm_vit_sweep_ends_with_soups(local_ray, tmp_path: Path) -> None:
    weights = _published("test_vit", tmp_path / "test_vit.safetensors", seed=0)
    config = minirotated(
        name="vit",
        arch="timm:test_vit",
        pretrained_weights=weights,
        inits=["pretrained"],
        n_hparams=3,
        **SMALL,
    )
    root = run_sweep(config, tmp_path)
    results = load_results(root)
    targets = results["trials"][results["trials"].stage == "target"]
    assert len(targets) == 3 and (targets.status == "done").all()
    soups = results["soups"]
    uniform = soups[soups.method == "uniform"].iloc[0]
    assert uniform.n_ingredients == 3
    assert read_meta(uniform.checkpoint).arch == "timm:test_vit"
    assert _soup_checkpoint_scores(uniform) == uniform.test_acc

    # diagnostics rebuild each init and feed every model the input it was trained on
    from raysoup.cli import main

    assert main(["diagnose", str(root), "--points", "3", "--pair-trials", "2"]) == 0
    diag = load_results(root)["diagnostics"]
    trials = targets.set_index("trial_id")
    ends = diag[(diag.diagnostic == "init_to_trial") & (diag.a == 1.0)]
    assert len(ends) == 3
    assert (ends.test_acc.values == trials.loc[ends.end].test_acc.values).all()
    middle = diag[(diag.diagnostic == "trial_to_trial") & (diag.a == 0.5)]
    assert len(middle) == 1  # the two best trials' average
