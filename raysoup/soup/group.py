"""The soups of one group — (dataset, test env, trial seed, init) — over the trials received.

``GroupSoup`` ties the pure Recipe-1 bookkeeping (``StreamingGreedy``) to real weights:

- Evaluating an ingredient *set* means averaging its checkpoints and scoring the average
  on ID-val. The average is always summed in **rank order** (best first), whatever order
  the trials arrived in, so the same set gives bit-identical weights — and hence the same
  accuracy — in a run that restarted, in a post-hoc run, or in an undisturbed one.
- Recipe 1 only ever tries ``soup + candidate`` where every soup member ranks above the
  candidate, so the running sum of the current soup is a rank-order *prefix*: trying a
  candidate is one load and one ``average_with`` (written into buffers reused from try
  to try). When an accepted newcomer changes the soup from the middle, the prefix sum is
  rebuilt from the checkpoints (one model in memory at a time).
- Device: the running mean lives on ``device`` (the soup maker's: on CUDA, the GPU);
  checkpoints are loaded on the CPU and each tensor moves once per ``add`` or try.
- Memory: the fp32 running mean, the trial weights, the network and at most
  ``max_models`` cached state dicts — whatever the number of trials.
- Every load checks the checkpoint's content hash against the hash the trial was offered
  with: a checkpoint replaced after it was offered raises ``StaleCheckpointError``, and the
  caller re-offers the new version (``StreamingGreedy`` replaces it consistently).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from raysoup.contract import SOUP_STAGE, group_slug
from raysoup.io import storage
from raysoup.io.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint
from raysoup.results.schema import ALL_SEEDS
from raysoup.soup.average import RunningSoup
from raysoup.soup.greedy import Candidate, Decision, StreamingGreedy

State = dict[str, torch.Tensor]
# What a soup checkpoint keeps of its trials' hparams: what rebuilding and feeding it needs.
SOUP_HPARAMS = ("nonlinear_classifier", "preprocess", "image_size")
Item = tuple[str, str]  # (trial_id, content_hash)


@dataclass(frozen=True, order=True)
class GroupKey:
    """Trials of one key are souped together; different inits are never mixed."""

    dataset: str
    test_env: int
    trial_seed: int
    init: str

    @property
    def slug(self) -> str:
        return group_slug(self.dataset, self.test_env, self.trial_seed, self.init)

    @property
    def all_seeds(self) -> GroupKey:
        """The key of every trial seed's trials of this (dataset, test env, init)."""
        return GroupKey(self.dataset, self.test_env, ALL_SEEDS, self.init)


@dataclass(frozen=True)
class Offer:
    """A finished target trial handed to the soup: built from its checkpoint's metadata
    (``from_meta``), carried as itself between Ray processes, and written as ``to_dict``
    (in the soup state and in the trial's final Tune result, ``RESULT_KEY``)."""

    RESULT_KEY: ClassVar[str] = "soup_offer"

    trial_id: str
    checkpoint: str
    id_val_acc: float
    content_hash: str
    group: GroupKey
    test_acc: float = math.nan

    @classmethod
    def from_checkpoint(cls, trial_id: str, checkpoint: str | Path) -> Offer:
        """The offer of a trial, from its checkpoint's metadata alone (local or URI)."""
        return cls.from_meta(trial_id, checkpoint, storage.read_meta(checkpoint))

    @classmethod
    def from_meta(cls, trial_id: str, checkpoint: str | Path, meta: CheckpointMeta) -> Offer:
        """The offer of a trial whose checkpoint at ``checkpoint`` has metadata ``meta``."""
        if meta.stage != "target":
            raise CheckpointError(
                f"{checkpoint}: only target trials are souped, this one is stage {meta.stage!r}"
            )
        return cls(
            trial_id=trial_id,
            checkpoint=str(checkpoint),
            id_val_acc=float(meta.metrics["id_val_acc"]),
            content_hash=meta.content_hash,
            group=GroupKey(meta.dataset, meta.test_env, meta.trial_seed, meta.init["strategy"]),
            test_acc=float(meta.metrics.get("test_acc", math.nan)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Offer:
        values = dict(data)
        values["group"] = GroupKey(**values["group"])
        return cls(**values)

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.trial_id, self.id_val_acc, self.content_hash)


class StaleCheckpointError(CheckpointError):
    """A trial's checkpoint no longer has the content hash it was offered with."""

    def __init__(self, offer: Offer, found_hash: str) -> None:
        super().__init__(
            f"{offer.checkpoint}: content hash changed since trial {offer.trial_id!r} was "
            f"offered ({offer.content_hash[:12]}... -> {found_hash[:12]}...)"
        )
        self.offer = offer
        self.found_hash = found_hash


def load_raysoup_checkpoint(offer: Offer) -> tuple[State, str]:
    """A raysoup checkpoint's weights and content hash (a URI is fetched to the local cache
    once; the load verifies the file's hash)."""
    state, meta = load_checkpoint(storage.local_checkpoint(offer.checkpoint))
    return state, meta.content_hash


class StateCache:
    """Loads checkpoints by (trial id, hash), keeping at most ``max_models`` in memory;
    ``loader`` reads one (default: a raysoup checkpoint)."""

    def __init__(
        self,
        max_models: int = 2,
        loader: Callable[[Offer], tuple[State, str]] = load_raysoup_checkpoint,
    ) -> None:
        if max_models < 0:
            raise ValueError(f"max_models={max_models}: expected >= 0")
        self.max_models = max_models
        self.loader = loader
        self._cache: OrderedDict[Item, State] = OrderedDict()
        self.n_loads = 0

    def load(self, offer: Offer) -> State:
        item = (offer.trial_id, offer.content_hash)
        if item in self._cache:
            self._cache.move_to_end(item)
            return self._cache[item]
        state, content_hash = self.loader(offer)
        self.n_loads += 1
        if content_hash != offer.content_hash:
            raise StaleCheckpointError(offer, content_hash)
        if self.max_models:
            self._cache[item] = state
            while len(self._cache) > self.max_models:
                self._cache.popitem(last=False)
        return state

    def clear(self) -> None:
        self._cache.clear()


Scorer = Callable[[Mapping[str, torch.Tensor]], float]


class GroupSoup:
    """Streaming greedy soup, uniform soup and ERM pick of one group.

    ``score`` maps averaged weights to their ID-val accuracy; it is only called for sets
    missing from ``memo`` (so a restored group with a full memo never touches data).
    """

    def __init__(
        self,
        key: GroupKey,
        score: Scorer,
        *,
        accept: str = "ge",
        states: StateCache | None = None,
        memo: Mapping[frozenset[Item], float] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.key = key
        self.device = torch.device(device) if device is not None else None
        self._score = score
        self.states = states if states is not None else StateCache()
        self.offers: dict[str, Offer] = {}
        self.greedy = StreamingGreedy(self._evaluate, accept=accept, memo=memo)
        self._prefix: list[Item] = []
        self._prefix_sum = RunningSoup(device=self.device)

    # ------------------------------------------------------------ offers

    def offer(self, offer: Offer) -> list[Decision]:
        """Add (or replace) a trial; returns the decisions made or re-made."""
        return self.offer_many([offer])

    def offer_many(self, offers: list[Offer]) -> list[Decision]:
        """Add (or replace) several trials, decided together (``StreamingGreedy.add_many``);
        returns the decisions made or re-made. On an error nothing is added."""
        for offer in offers:
            if offer.group != self.key:
                raise ValueError(
                    f"trial {offer.trial_id!r} belongs to {offer.group}, not {self.key}"
                )
        previous = dict(self.offers)
        self.offers.update((offer.trial_id, offer) for offer in offers)
        try:
            return self.greedy.add_many([offer.candidate for offer in offers])
        except BaseException:
            self.offers = previous
            raise

    @property
    def memo(self) -> dict[frozenset[Item], float]:
        return self.greedy.memo

    def ranked(self) -> list[Offer]:
        return [self.offers[c.trial_id] for c in self.greedy.candidates]

    def erm(self) -> Offer:
        """The best single trial by ID-val (ties: smaller trial id), as Recipe 1 ranks."""
        return self.ranked()[0]

    # ------------------------------------------------------------ weights

    def _items(self, offers: list[Offer]) -> list[Item]:
        return [(o.trial_id, o.content_hash) for o in offers]

    def _sync_prefix(self, wanted: list[Offer]) -> None:
        """Make the running sum hold exactly ``wanted`` (a rank-ordered list)."""
        items = self._items(wanted)
        if self._prefix != items[: len(self._prefix)]:
            self._prefix = []
            self._prefix_sum.clear()
        for offer in wanted[len(self._prefix) :]:
            self._prefix_sum.add(self.states.load(offer))
            self._prefix.append((offer.trial_id, offer.content_hash))

    def average(
        self, trial_ids: list[str] | set[str] | frozenset[str], *, reuse: bool = False
    ) -> State:
        """The uniform average of these trials' weights, summed in rank order.

        ``reuse=True`` (the greedy tries, scored at once) writes the weights into buffers
        that the next ``reuse=True`` call overwrites, instead of allocating new ones.
        """
        wanted = [o for o in self.ranked() if o.trial_id in trial_ids]
        if len(wanted) != len(set(trial_ids)):
            unknown = sorted(set(trial_ids) - {o.trial_id for o in wanted})
            raise ValueError(f"{self.key.slug}: unknown trials {unknown}")
        *head, last = wanted
        self._sync_prefix(head)
        return self._prefix_sum.average_with(self.states.load(last), reuse=reuse)

    def _evaluate(self, trial_ids: frozenset[str]) -> float:
        return self._score(self.average(trial_ids, reuse=True))

    def uniform_average(self) -> State:
        """Every trial of the group, summed in rank order with one model in memory."""
        total = RunningSoup(device=self.device)
        for offer in self.ranked():
            total.add(self.states.load(offer))
        return total.average()

    def release(self) -> None:
        """Drop cached weights (the group is final, or idle)."""
        self._prefix, self._prefix_sum = [], RunningSoup(device=self.device)
        self.states.clear()


def soup_meta(
    key: GroupKey, method: str, like: CheckpointMeta, ingredients: list[str], metrics: dict
) -> CheckpointMeta:
    """The metadata of a soup checkpoint: what it was made from, in the trials' format."""
    return CheckpointMeta(
        dataset=key.dataset,
        envs=list(like.envs),
        arch=like.arch,
        num_classes=like.num_classes,
        stage=SOUP_STAGE,
        test_env=key.test_env,
        trial_seed=key.trial_seed,
        hparams_seed=-1,
        hparams={k: v for k, v in like.hparams.items() if k in SOUP_HPARAMS},
        init={
            "strategy": key.init,
            "method": method,
            "sources": list(ingredients),
            "weights": [1.0 / len(ingredients)] * len(ingredients),
        },
        metrics=metrics,
    )
