"""Init strategies: which featurizer a run starts from.

Pure choices first (testable without torch models or files), then the code that turns a
plan into featurizer tensors.

- ``pretrained``  — the shared pretrained featurizer (ImageNet, or the built-in base).
- ``ratatouille`` — one auxiliary featurizer. Reference choice (ModelRatatouille): option
  ``k = hparams_seed % (n_aux_datasets + 1)``; ``k == 0`` is the pretrained featurizer,
  else auxiliary dataset ``k-1`` (datasets sorted by name), run ``hparams_seed % n_runs``.
  The ``random`` alternative draws ``k`` and the run from a seeded RNG instead.
- ``fusing``      — candidates are pretrained + one run per auxiliary dataset (the run the
  reference choice would take); ``lambda = softmax(R * u)``, ``u ~ U[0, 1)`` i.i.d. per
  candidate from the trial's seed; the featurizer is ``sum(lambda_i * theta_i)``.

Leakage guard: an auxiliary checkpoint whose recorded dataset is the target dataset is
never used (the pool skips it with a warning; loading it directly raises). One whose
training data is undeclared (an import with ``--undeclared``) refuses the pool unless
``allow_undeclared`` says the user accepts it; runs using it are marked.

Untrusted pools: a pool is refused (``CheckpointError``) when a symlink in it leads out of
it or a checkpoint's metadata is malformed or names a path outside it
(``raysoup.io.pool``); each checkpoint's header is checked again when it is loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from raysoup.contract import INITS, UNDECLARED
from raysoup.errors import BadInputError
from raysoup.io import storage
from raysoup.io.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    check_state_dict,
    load_checkpoint,
)
from raysoup.io.pool import check_meta_paths, check_pool_symlinks

RATATOUILLE_CHOICES = ("reference", "random")
AUX_BUFFERS = ("source", "pretrained")
PRETRAINED = "pretrained"  # the source name of the pretrained featurizer
FEATURIZER_PREFIX = "featurizer."
CLASSIFIER_PREFIX = "classifier."

T = TypeVar("T")


class LeakageError(BadInputError):
    """An auxiliary checkpoint was trained on the target dataset (or on undeclared data)."""


def is_undeclared(meta: CheckpointMeta) -> bool:
    """Whether nobody declared what a checkpoint was trained on."""
    return meta.dataset == UNDECLARED or meta.init.get("declared") is False


def undeclared_refusal(path: object) -> LeakageError:
    return LeakageError(
        f"{path}: auxiliary checkpoint with undeclared training data (imported with "
        f"--undeclared): it may have seen the target dataset. Set allow_undeclared_aux: true "
        f"(--allow-undeclared-aux) to use it anyway; the runs using it are marked"
    )


# ---------------------------------------------------------------- pure choices


def choose_ratatouille_reference(hparams_seed: int, pool: Sequence[Sequence[T]]) -> T | None:
    """The reference's deterministic choice; ``None`` means the pretrained featurizer."""
    k = hparams_seed % (len(pool) + 1)
    if k == 0:
        return None
    runs = pool[k - 1]
    return runs[hparams_seed % len(runs)]


def choose_ratatouille_random(seed: int, pool: Sequence[Sequence[T]]) -> T | None:
    """Seeded alternative: option and run drawn uniformly; ``None`` = pretrained."""
    rng = np.random.RandomState(seed)
    k = int(rng.randint(len(pool) + 1))
    if k == 0:
        return None
    runs = pool[k - 1]
    return runs[int(rng.randint(len(runs)))]


def fusing_candidates(hparams_seed: int, pool: Sequence[Sequence[T]]) -> list[T | None]:
    """Pretrained (``None``) + one run per auxiliary dataset, as in the reference."""
    return [None, *(runs[hparams_seed % len(runs)] for runs in pool)]


def fusing_weights(n_candidates: int, fusing_range: float, seed: int) -> np.ndarray:
    """``softmax(R * u)`` with ``u ~ U[0, 1)`` i.i.d.; ``R == 0`` gives the uniform average."""
    if n_candidates < 1:
        raise ValueError("fusing needs at least one candidate")
    if fusing_range < 0:
        raise ValueError(f"fusing_range must be >= 0, got {fusing_range}")
    u = np.random.RandomState(seed).random_sample(n_candidates)
    logits = fusing_range * u
    kappas = np.exp(logits - logits.max())  # shift for stability; softmax is unchanged
    return kappas / kappas.sum()


def mix_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``sum(w_i * state_i)`` for floating tensors, accumulated in float64.

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) cannot be interpolated:
    they are taken from the first state.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(
            f"need one weight per state, got {len(states)} states, {len(weights)} weights"
        )
    mixed: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            mixed[key] = first.clone()
            continue
        total = torch.zeros_like(first, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            total.add_(state[key].to(torch.float64), alpha=float(weight))
        mixed[key] = total.to(first.dtype)
    return mixed


@dataclass(frozen=True)
class InitPlan:
    """Which featurizers to combine, and with which weights (one source = a plain copy)."""

    strategy: str
    sources: list[str]  # "pretrained" or checkpoint paths
    weights: list[float]

    @property
    def uses_auxiliary(self) -> bool:
        return any(source != PRETRAINED for source in self.sources)


def plan_init(
    strategy: str,
    pool: Sequence[Sequence[str]],
    *,
    hparams_seed: int,
    seed: int,
    fusing_range: float = 4.0,
    ratatouille_choice: str = "reference",
) -> InitPlan:
    """The init of one run; ``pool`` is one sorted list of run paths per aux dataset."""
    if strategy not in INITS:
        raise ValueError(f"unknown init {strategy!r}; expected one of {INITS}")
    if strategy == "pretrained":
        return InitPlan(strategy, [PRETRAINED], [1.0])
    if not pool or any(not runs for runs in pool):
        raise ValueError(f"init {strategy!r} needs a non-empty auxiliary pool (--aux-dir)")
    if strategy == "ratatouille":
        if ratatouille_choice == "reference":
            chosen = choose_ratatouille_reference(hparams_seed, pool)
        elif ratatouille_choice == "random":
            chosen = choose_ratatouille_random(seed, pool)
        else:
            raise ValueError(
                f"unknown ratatouille_choice {ratatouille_choice!r}; "
                f"expected one of {RATATOUILLE_CHOICES}"
            )
        return InitPlan(strategy, [chosen or PRETRAINED], [1.0])
    candidates = fusing_candidates(hparams_seed, pool)
    weights = fusing_weights(len(candidates), fusing_range, seed)
    return InitPlan(strategy, [c or PRETRAINED for c in candidates], [float(w) for w in weights])


# ---------------------------------------------------------------- auxiliary pool


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (e.g. ``featurizer.``), with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class AuxPool:
    """Auxiliary checkpoints grouped by dataset, datasets and runs in a stable order."""

    runs: dict[str, list[str]] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    undeclared: list[str] = field(default_factory=list)  # accepted with allow_undeclared

    def as_lists(self) -> list[list[str]]:
        return [self.runs[name] for name in sorted(self.runs)]


def discover_aux_pool(
    dirs: Sequence[str | Path], target_dataset: str, allow_undeclared: bool = False
) -> AuxPool:
    """Find the auxiliary checkpoints under ``dirs`` (local paths or URIs, listed where they
    are: only their metadata is read); skip those of ``target_dataset``. Each root is an
    untrusted pool: escaping symlinks, malformed metadata or metadata paths outside the
    root refuse it with a ``CheckpointError``."""
    found: dict[str, list[tuple[int, str]]] = {}
    excluded: list[str] = []
    undeclared: list[str] = []
    for root in dirs:
        if not storage.is_dir(root):
            raise FileNotFoundError(f"auxiliary directory {root} does not exist")
        check_pool_symlinks(root)  # before listing: a symlinked checkpoint is refused, not skipped
        for path in storage.find_checkpoints(root):
            meta = storage.read_meta(path)
            check_meta_paths(meta, root, storage.join(path, META_FILE))
            if meta.dataset == target_dataset:
                excluded.append(str(path))
                continue
            if is_undeclared(meta):
                if not allow_undeclared:
                    raise undeclared_refusal(path)
                undeclared.append(str(path))
            found.setdefault(meta.dataset, []).append((meta.hparams_seed, str(path)))
    if excluded:
        warnings.warn(
            f"leakage guard: skipped {len(excluded)} auxiliary checkpoint(s) trained on the "
            f"target dataset {target_dataset!r}: {excluded[:3]}",
            stacklevel=2,
        )
    runs = {name: [p for _, p in sorted(items)] for name, items in sorted(found.items())}
    return AuxPool(runs=runs, excluded=excluded, undeclared=undeclared)


def load_aux_featurizer(
    path: str | Path,
    target_dataset: str,
    reference: Mapping[str, torch.Tensor],
    allow_undeclared: bool = False,
) -> dict[str, torch.Tensor]:
    """The ``featurizer.*`` tensors of an auxiliary checkpoint (never its head); the
    leakage guard reads the metadata before any weights are fetched."""
    meta = storage.read_meta(path)
    if meta.dataset == target_dataset:
        raise LeakageError(
            f"{path}: auxiliary checkpoint was trained on {meta.dataset!r}, the target dataset; "
            f"using it would leak target data"
        )
    if is_undeclared(meta) and not allow_undeclared:
        raise undeclared_refusal(path)
    state, _ = load_checkpoint(storage.local_checkpoint(path))
    featurizer = strip_prefix(state, FEATURIZER_PREFIX)
    if not featurizer:
        raise CheckpointError(f"{path}: holds no '{FEATURIZER_PREFIX}*' tensors")
    check_state_dict(featurizer, reference, storage.join(path, WEIGHTS_FILE))
    return featurizer


def featurizer_from_plan(
    plan: InitPlan,
    pretrained: Mapping[str, torch.Tensor],
    target_dataset: str,
    aux_buffers: str = "source",
    allow_undeclared: bool = False,
) -> dict[str, torch.Tensor]:
    """The featurizer state a plan describes.

    ``aux_buffers="source"`` takes buffers (BatchNorm statistics) from the same sources
    as the parameters, mixed alike; ``"pretrained"`` keeps the pretrained buffers, as the
    reference does (it copies ``named_parameters`` only).
    """
    if aux_buffers not in AUX_BUFFERS:
        raise ValueError(f"unknown aux_buffers {aux_buffers!r}; expected one of {AUX_BUFFERS}")
    states = [
        dict(pretrained)
        if source == PRETRAINED
        else load_aux_featurizer(source, target_dataset, pretrained, allow_undeclared)
        for source in plan.sources
    ]
    mixed = mix_state_dicts(states, plan.weights)
    if aux_buffers == "pretrained":
        for key in buffer_keys(pretrained):
            mixed[key] = pretrained[key].clone()
    return mixed


def buffer_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """BatchNorm statistics, identified by name (state dicts do not mark buffers)."""
    suffixes = ("running_mean", "running_var", "num_batches_tracked")
    return [k for k in state if k.rsplit(".", 1)[-1] in suffixes]
