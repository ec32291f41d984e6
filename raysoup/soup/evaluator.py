"""Accuracy of a soup's weights on one group's ID-val and test data, loaded once.

A trial's ``id_val_acc`` is measured by ``training.evaluate.evaluate_splits`` over the
parts ``data.splits.id_val_parts`` names (the training envs' ``out`` splits), no
augmentation. The evaluator pools the very same parts, in the same batches, so a
one-ingredient soup scores exactly its trial's number.

The ensemble (logit average of several trials) is scored the same way: one trial at a
time, its logits added to a float64 sum per example in the order given, so the memory is
one network and the sums (plus whatever logits the caller chose to keep), whatever the
number of trials, and a given order gives bit-identical sums. Its prediction is the
argmax of the sum (of the average: the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raysoup.data.base import MultiDomainDataset
from raysoup.data.loaders import eval_batches
from raysoup.data.registry import dataset_class, load_dataset
from raysoup.data.splits import Part, id_val_parts, split_envs, test_parts
from raysoup.data.transforms import Preprocess, recorded_preprocess
from raysoup.io.checkpoint import CheckpointMeta
from raysoup.models.networks import Network, build_network
from raysoup.training.evaluate import count_correct, pooled_accuracy


@dataclass(frozen=True)
class DataKey:
    """What fixes the evaluation data of a group (every init shares it)."""

    dataset: str
    test_env: int
    trial_seed: int
    preprocess: Preprocess | None = None  # the model's input (``recorded_preprocess``)

    @classmethod
    def of(cls, meta: CheckpointMeta) -> DataKey:
        """The evaluation data of a trial or soup checkpoint."""
        return cls(meta.dataset, meta.test_env, meta.trial_seed, recorded_preprocess(meta.hparams))


class GroupData:
    """One (dataset, test env, trial seed): its ID-val parts and its test env."""

    def __init__(self, key: DataKey, data_dir: str | Path | None, holdout_fraction: float) -> None:
        self.key = key
        self.dataset: MultiDomainDataset = load_dataset(
            key.dataset, data_dir, augment=False, preprocess=key.preprocess
        )
        splits = split_envs(self.dataset.env_sizes(), key.trial_seed, holdout_fraction)

        def indices(parts: list[Part]) -> list[tuple[int, np.ndarray]]:
            return [(env, splits[env].part(name)) for env, name in parts]

        # The trainer's parts, in the trainer's batches: the same logits, the same numbers.
        self.id_val = indices(id_val_parts(splits, key.test_env))
        self.test = indices(test_parts(splits, key.test_env))

    def accuracy(
        self, network: Network, parts: list[tuple[int, np.ndarray]], device: torch.device
    ) -> float:
        return pooled_accuracy(
            count_correct(network, eval_batches(self.dataset, env_index, indices), device)
            for env_index, indices in parts
        )

    @torch.no_grad()
    def scores(
        self, network: Network, parts: list[tuple[int, np.ndarray]], device: torch.device
    ) -> tuple[float, float]:
        """``(accuracy, mean cross-entropy)`` of ``parts`` in one pass: the accuracy counts
        exactly as ``accuracy`` does (the same batches, the same argmax); the loss is summed
        in float64. Both ``nan`` when ``parts`` hold no example."""
        network.eval()
        correct = total = 0
        loss = 0.0
        for env_index, indices in parts:
            for x, y in eval_batches(self.dataset, env_index, indices):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                logits = network(x)
                correct += int((logits.argmax(dim=1) == y).sum())
                total += int(y.numel())
                loss += float(F.cross_entropy(logits.double(), y, reduction="sum"))
        if not total:
            return float("nan"), float("nan")
        return correct / total, loss / total

    @torch.no_grad()
    def logits(
        self, network: Network, parts: list[tuple[int, np.ndarray]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, labels)`` of every example of ``parts``, in order: float64 on the CPU
        (exactly the float32 logits ``count_correct`` takes its argmax of)."""
        network.eval()
        logits, labels = [], []
        for env_index, indices in parts:
            for x, y in eval_batches(self.dataset, env_index, indices):
                logits.append(network(x.to(device, non_blocking=True)).double().cpu())
                labels.append(y)
        if not logits:
            return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        return torch.cat(logits), torch.cat(labels)


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
            image_size=meta.hparams.get("image_size"),
        ).to(device)
        self.network.eval()
        self._labels: dict[str, torch.Tensor] = {}  # per split, set by trial_logits

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.network.load_state_dict(state)

    def id_val_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        self._load(state)
        return self.data.accuracy(self.network, self.data.id_val, self.device)

    def test_acc(self, state: Mapping[str, torch.Tensor]) -> float:
        self._load(state)
        return self.data.accuracy(self.network, self.data.test, self.device)

    def scores(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``id_val_acc``, ``id_val_loss``, ``test_acc``, ``test_loss`` of one model."""
        self._load(state)
        out = {}
        for name, parts in (("id_val", self.data.id_val), ("test", self.data.test)):
            out[f"{name}_acc"], out[f"{name}_loss"] = self.data.scores(
                self.network, parts, self.device
            )
        return out

    def trial_logits(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"id_val": ..., "test": ...}``: the float32 logits of one model (exactly the
        network's output; float64 of them is what the ensemble sums)."""
        self._load(state)
        out = {}
        for name, parts in (("id_val", self.data.id_val), ("test", self.data.test)):
            logits, self._labels[name] = self.data.logits(self.network, parts, self.device)
            out[name] = logits.float()
        return out

    def ensemble_accs(self, models: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, float]:
        """``(id_val_acc, test_acc)`` of the logit average of ``models`` (``trial_logits``
        of each, taken one at a time, e.g. computed lazily), summed in float64 in the
        order given."""
        sums: dict[str, torch.Tensor] = {}
        for logits in models:
            for name, value in logits.items():
                if name in sums:
                    sums[name].add_(value.double())
                else:  # a copy: the caller's logits stay as they were
                    sums[name] = value.to(torch.float64, copy=True)
        if not sums:
            raise ValueError("an ensemble needs at least one model")
        accs = []
        for name in ("id_val", "test"):
            labels = self._labels[name]
            total = labels.numel()
            correct = int((sums[name].argmax(dim=1) == labels).sum()) if total else 0
            accs.append(correct / total if total else float("nan"))
        return accs[0], accs[1]
