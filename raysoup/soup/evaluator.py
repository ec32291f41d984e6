"""Accuracy of a soup's weights on one group's ID-val and test data, loaded once.

A trial's ``id_val_acc`` is measured by ``training.evaluate.evaluate_splits``: the union
of the training envs' ``out`` splits, no augmentation. The evaluator uses the very same
splits and batches, so a one-ingredient soup scores exactly its trial's number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raysoup.data.base import MultiDomainDataset
from raysoup.data.loaders import eval_batches
from raysoup.data.registry import dataset_class, load_dataset
from raysoup.data.splits import split_envs
from raysoup.io.checkpoint import CheckpointMeta
from raysoup.models.networks import Network, build_network
from raysoup.training.evaluate import count_correct


@dataclass(frozen=True)
class DataKey:
    """What fixes the evaluation data of a group (every init shares it)."""

    dataset: str
    test_env: int
    trial_seed: int


class GroupData:
    """One (dataset, test env, trial seed): its ID-val parts and its test env."""

    def __init__(self, key: DataKey, data_dir: str | Path | None, holdout_fraction: float) -> None:
        self.key = key
        self.dataset: MultiDomainDataset = load_dataset(key.dataset, data_dir, augment=False)
        splits = split_envs(self.dataset.env_sizes(), key.trial_seed, holdout_fraction)
        self.id_val = [(s.env_index, s.out_indices) for s in splits if s.env_index != key.test_env]
        test = splits[key.test_env]
        self.test = [(test.env_index, np.concatenate([test.in_indices, test.out_indices]))]

    def accuracy(
        self, network: Network, parts: list[tuple[int, np.ndarray]], device: torch.device
    ) -> float:
        correct = total = 0
        for env_index, indices in parts:
            batches = eval_batches(self.dataset, env_index, indices)
            c, t = count_correct(network, batches, device)
            correct, total = correct + c, total + t
        return correct / total if total else float("nan")


class SoupEvaluator:
    """Loads a state dict into one reusable network and scores it."""

    def __init__(self, data: GroupData, meta: CheckpointMeta, device: torch.device) -> None:
        cls = dataset_class(meta.dataset)
        self.data = data
        self.device = device
        self.network = build_network(
            meta.arch,
            meta.num_classes,
            input_channels=cls.INPUT_SHAPE[0],
            nonlinear_classifier=bool(meta.hparams.get("nonlinear_classifier", False)),
        ).to(device)
        self.network.eval()

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.network.load_state_dict(state)

    def id_val_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        self._load(state)
        return self.data.accuracy(self.network, self.data.id_val, self.device)

    def test_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        self._load(state)
        return self.data.accuracy(self.network, self.data.test, self.device)
