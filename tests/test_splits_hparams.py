from __future__ import annotations

import numpy as np
import pytest

from raysoup.data.splits import split_env, split_envs, training_envs
from raysoup.seeding import seed_hash
from raysoup.training import hparams as hp


def test_seed_hash_is_stable_across_processes() -> None:
    # md5-based, not Python's salted hash(): fixed values, same as DomainBed's misc.seed_hash
    assert seed_hash(0, 0) == seed_hash(0, 0)
    assert seed_hash(0, 0) != seed_hash(0, 1)
    import hashlib

    assert seed_hash(3, "lr") == int(hashlib.md5(b"(3, 'lr')").hexdigest(), 16) % 2**31


def test_split_matches_domainbed_reference() -> None:
    n, env_index, trial_seed = 101, 2, 7
    keys = list(range(n))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    split = split_env(n, env_index, trial_seed, 0.2)
    assert split.out_indices.tolist() == keys[: int(n * 0.2)]
    assert split.in_indices.tolist() == keys[int(n * 0.2) :]


def test_splits_deterministic_disjoint_and_seed_dependent() -> None:
    a = split_envs([500, 480, 333], trial_seed=0)
    b = split_envs([500, 480, 333], trial_seed=0)
    c = split_envs([500, 480, 333], trial_seed=1)
    for sa, sb, sc, n in zip(a, b, c, [500, 480, 333], strict=True):
        assert np.array_equal(sa.in_indices, sb.in_indices)
        assert np.array_equal(sa.out_indices, sb.out_indices)
        assert not set(sa.in_indices) & set(sa.out_indices)
        assert sorted([*sa.in_indices, *sa.out_indices]) == list(range(n))
        assert len(sa.out_indices) == int(n * 0.2)
        assert not np.array_equal(sa.out_indices, sc.out_indices)
    # different envs of one trial seed get different shuffles
    assert not np.array_equal(a[0].out_indices[:50], a[1].out_indices[:50])


def test_split_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_env(10, 0, 0, 1.5)
    with pytest.raises(ValueError, match="test_env=6 is out of range"):
        training_envs(6, 6)
    assert training_envs(4, -1) == [0, 1, 2, 3]
    assert training_envs(4, 2) == [0, 1, 3]


def test_hparams_seed_zero_gives_defaults() -> None:
    h = hp.sample_hparams("PACS", 0, 5)
    assert h["lr"] == 5e-5 and h["weight_decay"] == 0 and h["batch_size"] == 32
    assert h["resnet_dropout"] == 0 and h["lp_steps"] == 200


def test_hparams_deterministic_and_in_the_diwa_ranges() -> None:
    seen_lr = set()
    for seed in range(1, 40):
        h = hp.sample_hparams("PACS", seed)
        assert h == hp.sample_hparams("PACS", seed)
        assert h["lr"] in (1e-5, 3e-5, 5e-5)
        assert h["weight_decay"] in (1e-4, 1e-6)
        assert h["resnet_dropout"] in (0.0, 0.1, 0.5)
        assert h["batch_size"] == 32
        seen_lr.add(h["lr"])
    assert len(seen_lr) == 3


def test_hparams_domainbed_registry_ranges() -> None:
    for seed in range(1, 20):
        h = hp.sample_hparams("PACS", seed, registry="domainbed")
        assert 10**-5 <= h["lr"] <= 10**-3.5
        assert 10**-6 <= h["weight_decay"] <= 10**-2
        assert 8 <= h["batch_size"] <= int(2**5.5)
        small = hp.sample_hparams("X", seed, registry="domainbed", small_images=True)
        assert 10**-4.5 <= small["lr"] <= 10**-2.5 and small["weight_decay"] == 0


def test_domainbed_registry_never_samples_a_nonlinear_classifier() -> None:
    """DomainBed fixed ``nonlinear_classifier`` to False ("nonlinear classifiers disabled")."""
    for dataset, small in (("PACS", False), ("MiniRotatedMNIST", True)):
        drawn = {
            hp.sample_hparams(dataset, seed, registry="domainbed", small_images=small)[
                "nonlinear_classifier"
            ]
            for seed in range(60)
        }
        assert drawn == {False}


def test_trial_seed_switch() -> None:
    independent = [hp.sample_hparams("PACS", 3, t) for t in range(5)]
    assert all(h == independent[0] for h in independent)
    mixed = [hp.sample_hparams("PACS", 3, t, hparams_depend_on_trial_seed=True) for t in range(8)]
    assert len({tuple(sorted(h.items())) for h in mixed}) > 1
    # the reference scheme: seed_hash(hparams_seed, trial_seed) as the random seed
    specs = hp.registry_specs("diwa", "PACS", False)
    assert mixed[2] == hp.sample_from_specs(specs, 3, seed_hash(3, 2))


def test_adding_a_hparam_does_not_shift_the_others() -> None:
    specs = hp.registry_specs("diwa", "PACS", False)
    extended = [hp.HparamSpec("new_knob", 1.0, lambda r: float(r.uniform(0, 9))), *specs]
    for seed in range(1, 30):
        before = hp.sample_from_specs(specs, seed, seed)
        after = hp.sample_from_specs(extended, seed, seed)
        assert {k: after[k] for k in before} == before


def test_hparams_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown hyperparameter 'lrr'"):
        hp.sample_hparams("PACS", 1, overrides={"lrr": 1.0})
    with pytest.raises(ValueError, match="unknown hparams registry"):
        hp.sample_hparams("PACS", 1, registry="nope")
    assert hp.sample_hparams("PACS", 1, overrides={"lr": 0.5})["lr"] == 0.5
