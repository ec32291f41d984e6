"""The nuisance benchmark (experimental): rendered datasets and the shipped foundation."""

from __future__ import annotations

from pathlib import Path

import torch

from raysoup.data import load_dataset
from raysoup.data.loaders import eval_batches, train_batches
from raysoup.data.nuisance import (
    NUISANCE_AUXILIARY,
    NUISANCE_TARGET,
    TARGET_LEVELS,
    NuisanceMNIST,
    target_style,
)
from raysoup.data.render import FONTS, glyph_masks, render
from raysoup.data.splits import split_envs
from raysoup.models.foundation import FOUNDATION_CHARS, foundation_dir
from raysoup.training.trainer import RunSpec, train_run


def test_target_is_domainbed_style_and_deterministic() -> None:
    target = load_dataset(NUISANCE_TARGET)
    assert target.ENVIRONMENTS == ["0", "1", "2", "3", "4"]
    assert len(target.envs) == 5 and all(len(e) == 1000 for e in target.envs)
    ids = [s for env in target.envs for s in env.source_ids]
    assert len(set(ids)) == 5000 and all(s.startswith("mnist5k:") for s in ids)
    x, y = target.envs[0][0]
    assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1 and 0 <= y < 10
    again = NuisanceMNIST.build(NuisanceMNIST.__new__(NuisanceMNIST))  # from scratch
    assert all(torch.equal(a.images, b.images) for a, b in zip(target.envs, again, strict=True))
    split = split_envs(target.env_sizes(), 0)[2]
    a = train_batches(target, 2, split.in_indices, 8, seed=5)
    b = train_batches(target, 2, split.in_indices, 8, seed=5)
    assert torch.equal(next(a)[0], next(b)[0])
    assert sum(len(y) for _, y in eval_batches(target, 2, split.out_indices, 64)) == 200


def test_target_environments_are_a_latin_square_of_nuisances() -> None:
    for levels in TARGET_LEVELS.values():
        assert sorted(levels) == [0, 1, 2, 3, 4]  # each level once per nuisance
    for e in range(5):  # every pair of environments differs in every nuisance
        for f in range(e + 1, 5):
            assert all(levels[e] != levels[f] for levels in TARGET_LEVELS.values())
    assert target_style(0) != target_style(1)


def test_auxiliary_and_foundation_images_never_overlap_the_target() -> None:
    target_ids = {s for env in load_dataset(NUISANCE_TARGET).envs for s in env.source_ids}
    label_spaces = set()
    for name in NUISANCE_AUXILIARY:
        ds = load_dataset(name)
        ids = {s for env in ds.envs for s in env.source_ids}
        assert not ids & target_ids, name
        label_spaces.add(ds.NUM_CLASSES)
        for env in ds.envs:
            assert int(env.labels.max()) < ds.NUM_CLASSES
    assert len(label_spaces) >= 2
    # The foundation sees Latin letters and symbols only: no digit, no Greek letter.
    assert not set(FOUNDATION_CHARS) & set("0123456789")
    assert all(not 0x391 <= ord(c) <= 0x3C9 for c in FOUNDATION_CHARS)
    _, _, glyph_ids = glyph_masks(FOUNDATION_CHARS)
    assert not set(glyph_ids) & target_ids


def test_render_is_seeded_and_fonts_ship() -> None:
    masks, labels, _ = glyph_masks("AB")
    assert len(labels) == 2 * len(FONTS)
    style = target_style(3)
    assert torch.equal(render(masks, style, 7), render(masks, style, 7))
    assert not torch.equal(render(masks, style, 7), render(masks, style, 8))


def test_target_run_starts_from_the_shipped_foundation(tmp_path: Path) -> None:
    """LP then a short target run: the featurizer starts from the foundation's weights."""
    from raysoup.io.checkpoint import load_checkpoint

    common = {"dataset": NUISANCE_TARGET, "test_env": 2, "device": "cpu", "checkpoint_freq": 10}
    lp = train_run(RunSpec(out=tmp_path / "lp", stage="lp", steps=10, **common))
    foundation, _ = load_checkpoint(foundation_dir())
    lp_state, lp_meta = load_checkpoint(tmp_path / "lp")
    assert lp_meta.arch == "glyphcnn" and lp["id_val_acc"] > 0.1
    for key, value in lp_state.items():
        if key.startswith("featurizer."):
            assert torch.equal(value, foundation[key]), key  # frozen during the LP
    run = train_run(RunSpec(out=tmp_path / "t", steps=10, lp_head=tmp_path / "lp", **common))
    assert run["init_sources"] == ["pretrained"] and 0 <= run["test_acc"] <= 1


def test_sweep_plans_no_base_stage_for_the_foundation(tmp_path: Path) -> None:
    from raysoup.sweep.config import load_config
    from raysoup.sweep.plan import plan_sweep

    config = load_config(
        None,
        dataset=NUISANCE_TARGET,
        test_envs=[2],
        aux_datasets=list(NUISANCE_AUXILIARY),
        aux_n_hparams=1,
    )
    plan = plan_sweep(config, tmp_path)
    assert "base" not in plan and {"lp", "aux", "target"} <= set(plan)
    for runs in plan.values():
        for run in runs:
            assert run.spec["pretrained"] is None  # the trainer takes the shipped foundation
