"""Per-environment in/out splits, exactly as DomainBed makes them.

Each environment is split once per ``trial_seed``: a shuffle seeded by
``seed_hash(trial_seed, env_index)``; the first ``int(n * holdout_fraction)`` shuffled
indices are the ``out`` split (ID validation for training envs), the rest the ``in``
split (training data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysoup.seeding import seed_hash

DEFAULT_HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class EnvSplit:
    """Indices into one environment."""

    env_index: int
    in_indices: np.ndarray
    out_indices: np.ndarray

    def part(self, name: str) -> np.ndarray:
        """The indices of part ``"in"`` or ``"out"``."""
        return {"in": self.in_indices, "out": self.out_indices}[name]


Part = tuple[int, str]  # (env index, "in" | "out")


def id_val_parts(splits: list[EnvSplit], test_env: int) -> list[Part]:
    """What ``id_val_acc`` pools: the ``out`` splits of the training envs (the number the
    greedy soup sorts and accepts by). Trainer and soup evaluator both ask here, so a
    one-ingredient soup scores exactly its trial's number."""
    return [(s.env_index, "out") for s in splits if s.env_index != test_env]


def test_parts(splits: list[EnvSplit], test_env: int) -> list[Part]:
    """What ``test_acc`` pools: the whole held-out env, ``in`` then ``out`` (as the DiWA
    and ratatouille soup scripts report it); none without a test env."""
    return [(test_env, "in"), (test_env, "out")] if 0 <= test_env < len(splits) else []


def split_env(
    n_examples: int, env_index: int, trial_seed: int, holdout_fraction: float
) -> EnvSplit:
    """Split ``range(n_examples)`` into ``in`` and ``out`` (DomainBed's ``split_dataset``)."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    if n_examples < 2:
        raise ValueError(f"environment {env_index} has {n_examples} examples; need at least 2")
    keys = list(range(n_examples))  # a list, as in DomainBed: same permutation for the seed
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    n_out = int(n_examples * holdout_fraction)
    shuffled = np.asarray(keys, dtype=np.int64)
    return EnvSplit(env_index, in_indices=shuffled[n_out:], out_indices=shuffled[:n_out])


def split_envs(
    env_sizes: list[int], trial_seed: int, holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
) -> list[EnvSplit]:
    """The in/out split of every environment for one trial seed."""
    return [
        split_env(size, index, trial_seed, holdout_fraction) for index, size in enumerate(env_sizes)
    ]


def training_envs(n_envs: int, test_env: int) -> list[int]:
    """Indices of the training environments; ``test_env == -1`` means train on all."""
    if test_env != -1 and not 0 <= test_env < n_envs:
        raise ValueError(
            f"test_env={test_env} is out of range: expected -1 (train on all envs) "
            f"or 0..{n_envs - 1}"
        )
    return [i for i in range(n_envs) if i != test_env]
