"""What ``SoupMaker`` needs to know about checkpoints and evaluation, in one seam.

The maker's Recipe 1, persistence and Parquet outputs know nothing about how a trial's
weights are read or scored. ``RaysoupBackend`` is raysoup's own sweeps: checkpoints are
raysoup checkpoints (``model.safetensors`` + ``raysoup.json``, hash checked), scored on the
group's ID-val and test data by ``SoupEvaluator``. ``raysoup.tune`` plugs in another one:
any Tune trainable's state-dict files, scored by the user's function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from raysoup.io import storage
from raysoup.io.checkpoint import CheckpointMeta
from raysoup.soup.evaluator import DataKey, GroupData, SoupEvaluator
from raysoup.soup.group import GroupKey, Offer, load_raysoup_checkpoint, soup_meta

State = dict[str, torch.Tensor]


class Evaluator(Protocol):
    """Scores the weights of one group (``SoupEvaluator`` is one)."""

    def id_val_acc(self, state: Mapping[str, torch.Tensor]) -> float: ...

    def test_acc(self, state: Mapping[str, torch.Tensor]) -> float: ...

    def trial_logits(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def ensemble_accs(
        self, models: Iterable[Mapping[str, torch.Tensor]]
    ) -> tuple[float, float]: ...


class SoupBackend(Protocol):
    """How a maker reads trials and scores soups."""

    def load(self, offer: Offer) -> tuple[State, str]:
        """A trial's weights (on the CPU) and the content hash of what was read."""
        ...

    def content_hash(self, checkpoint: str) -> str | None:
        """The content hash a trial's checkpoint has now (cheap: no weights read);
        ``None`` when it is gone."""
        ...

    def offer(self, trial_id: str, checkpoint: str) -> Offer:
        """The offer of a trial whose checkpoint was replaced since it was offered."""
        ...

    def evaluator(self, key: GroupKey, first: Offer) -> Evaluator:
        """The evaluator of group ``key``; ``first`` is its best trial."""
        ...

    def soup_meta(
        self, key: GroupKey, method: str, best: Offer, ingredients: list[str], metrics: dict
    ) -> CheckpointMeta:
        """The metadata of a soup checkpoint of ``key`` (``best``: its ERM trial)."""
        ...


class RaysoupBackend:
    """raysoup checkpoints, scored on the group's own data (the sweeps' backend)."""

    def __init__(
        self,
        device: torch.device,
        data_dir: str | Path | None = None,
        holdout_fraction: float = 0.2,
    ) -> None:
        self.device = device
        self.data_dir = data_dir
        self.holdout_fraction = holdout_fraction
        self._data: dict[DataKey, GroupData] = {}

    def load(self, offer: Offer) -> tuple[State, str]:
        return load_raysoup_checkpoint(offer)

    def content_hash(self, checkpoint: str) -> str | None:
        if not storage.is_checkpoint(checkpoint):
            return None
        return storage.read_meta(checkpoint).content_hash

    def offer(self, trial_id: str, checkpoint: str) -> Offer:
        return Offer.from_checkpoint(trial_id, checkpoint)

    def evaluator(self, key: GroupKey, first: Offer) -> SoupEvaluator:
        meta = storage.read_meta(first.checkpoint)
        data_key = DataKey.of(meta)
        if data_key not in self._data:
            self._data[data_key] = GroupData(data_key, self.data_dir, self.holdout_fraction)
        return SoupEvaluator(self._data[data_key], meta, self.device)

    def soup_meta(
        self, key: GroupKey, method: str, best: Offer, ingredients: list[str], metrics: dict
    ) -> CheckpointMeta:
        like = storage.read_meta(best.checkpoint)
        return soup_meta(key, method, like, ingredients, metrics)
