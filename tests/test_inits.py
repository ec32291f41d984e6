from __future__ import annotations

import numpy as np
import pytest
import torch

from raysoup.io.checkpoint import CheckpointMeta, save_checkpoint
from raysoup.training import inits


def test_fusing_weights_follow_the_formula() -> None:
    for n, r, seed in [(1, 4.0, 0), (5, 4.0, 3), (5, 0.0, 3), (4, 10.0, 99)]:
        w = inits.fusing_weights(n, r, seed)
        u = np.random.RandomState(seed).random_sample(n)
        expected = np.exp(r * u) / np.exp(r * u).sum()
        np.testing.assert_allclose(w, expected, rtol=1e-12)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert (w > 0).all()
    np.testing.assert_allclose(inits.fusing_weights(4, 0.0, 1), np.full(4, 0.25))
    assert not np.allclose(inits.fusing_weights(4, 4.0, 1), inits.fusing_weights(4, 4.0, 2))
    with pytest.raises(ValueError, match="fusing_range"):
        inits.fusing_weights(3, -1.0, 0)


def test_ratatouille_reference_choice() -> None:
    pool = [["a0", "a1"], ["b0", "b1", "b2"], ["c0"]]
    got = [inits.choose_ratatouille_reference(h, pool) for h in range(8)]
    # k = h % 4: 0 -> pretrained, else dataset k-1, run h % n_runs
    assert got == [None, "a1", "b2", "c0", None, "a1", "b0", "c0"]


def test_ratatouille_random_choice_is_seeded() -> None:
    pool = [["a0", "a1"], ["b0", "b1", "b2"]]
    draws = [inits.choose_ratatouille_random(s, pool) for s in range(200)]
    assert draws == [inits.choose_ratatouille_random(s, pool) for s in range(200)]
    assert set(draws) == {None, "a0", "a1", "b0", "b1", "b2"}


def test_plan_fusing_candidates_are_pretrained_plus_one_run_per_dataset() -> None:
    pool = [["a0", "a1"], ["b0", "b1", "b2"]]
    plan = inits.plan_init("fusing", pool, hparams_seed=4, seed=11, fusing_range=4.0)
    assert plan.sources == ["pretrained", "a0", "b1"]
    np.testing.assert_allclose(plan.weights, inits.fusing_weights(3, 4.0, 11))
    assert plan.uses_auxiliary
    plan = inits.plan_init("ratatouille", pool, hparams_seed=3, seed=0)
    assert plan.sources == ["pretrained"] and not plan.uses_auxiliary
    with pytest.raises(ValueError, match="non-empty auxiliary pool"):
        inits.plan_init("fusing", [], hparams_seed=1, seed=0)


def test_mix_state_dicts() -> None:
    a = {"w": torch.ones(3), "n": torch.tensor(5)}
    b = {"w": torch.full((3,), 3.0), "n": torch.tensor(9)}
    mixed = inits.mix_state_dicts([a, b], [0.25, 0.75])
    torch.testing.assert_close(mixed["w"], torch.full((3,), 2.5))
    assert mixed["n"].item() == 5 and mixed["n"].dtype == torch.int64


def _featurizer_checkpoint(path, dataset: str, value: float) -> None:
    state = {
        "featurizer.conv.weight": torch.full((2, 2), value),
        "featurizer.bn.running_mean": torch.full((2,), value),
        "featurizer.bn.num_batches_tracked": torch.tensor(7),
        "classifier.weight": torch.zeros(4, 2),
    }
    save_checkpoint(
        path,
        state,
        CheckpointMeta(dataset=dataset, envs=["a"], arch="x", num_classes=4, stage="aux"),
    )


def test_leakage_guard(tmp_path) -> None:
    _featurizer_checkpoint(tmp_path / "pool" / "aux1", "OtherSet", 1.0)
    _featurizer_checkpoint(tmp_path / "pool" / "leak", "Target", 2.0)
    reference = {
        "conv.weight": torch.zeros(2, 2),
        "bn.running_mean": torch.zeros(2),
        "bn.num_batches_tracked": torch.tensor(0),
    }
    with pytest.raises(inits.LeakageError, match="target dataset"):
        inits.load_aux_featurizer(tmp_path / "pool" / "leak", "Target", reference)
    with pytest.warns(UserWarning, match="leakage guard"):
        pool = inits.discover_aux_pool([tmp_path / "pool"], "Target")
    assert list(pool.runs) == ["OtherSet"] and len(pool.excluded) == 1
    # only featurizer tensors come from the auxiliary checkpoint
    state = inits.load_aux_featurizer(tmp_path / "pool" / "aux1", "Target", reference)
    assert set(state) == set(reference)


def test_featurizer_from_plan_buffers(tmp_path) -> None:
    _featurizer_checkpoint(tmp_path / "aux", "OtherSet", 3.0)
    pretrained = {
        "conv.weight": torch.ones(2, 2),
        "bn.running_mean": torch.ones(2),
        "bn.num_batches_tracked": torch.tensor(1),
    }
    plan = inits.InitPlan("fusing", ["pretrained", str(tmp_path / "aux")], [0.5, 0.5])
    mixed = inits.featurizer_from_plan(plan, pretrained, "Target", aux_buffers="source")
    torch.testing.assert_close(mixed["conv.weight"], torch.full((2, 2), 2.0))
    torch.testing.assert_close(mixed["bn.running_mean"], torch.full((2,), 2.0))
    assert mixed["bn.num_batches_tracked"].item() == 1
    reference = inits.featurizer_from_plan(plan, pretrained, "Target", aux_buffers="pretrained")
    torch.testing.assert_close(reference["conv.weight"], torch.full((2, 2), 2.0))
    torch.testing.assert_close(reference["bn.running_mean"], torch.ones(2))
