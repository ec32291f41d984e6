"""Someone else's fine-tunings as raysoup checkpoints: ``import-featurizer`` and ``pool add``.

Both read a foreign checkpoint (``raysoup.models.weights.read_weights``: timm, torchvision,
Hugging Face, raysoup), rename and shape-check its featurizer against ``arch``, and write
a raysoup checkpoint holding ``featurizer.*`` alone (the head is never taken: class
counts differ) with metadata saying where it came from:

- ``dataset``: the *declared* training dataset, which the leakage guard compares with the
  target dataset; ``UNDECLARED`` when the user explicitly accepted not knowing it
  (``--undeclared``), which a target sweep then refuses unless ``allow_undeclared_aux``;
- ``init``: ``strategy: "foreign"``, ``source`` (the path read), ``source_format``,
  ``source_hash`` (sha256 of the files read), ``declared`` (bool);
- ``hparams["preprocess"]``: the input the source's folder declares, if any.

``pool add`` writes ``POOL/<dataset>-<source hash[:12]>``: adding the same weights again
is a no-op, and the write is atomic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysoup.contract import UNDECLARED
from raysoup.data.registry import DATASETS
from raysoup.data.transforms import preprocess_record
from raysoup.io.checkpoint import CheckpointMeta, is_checkpoint, read_meta, save_checkpoint
from raysoup.io.validate import CheckpointError
from raysoup.models.convert import fit_featurizer
from raysoup.models.networks import build_network, check_arch
from raysoup.models.weights import ForeignWeights, read_weights
from raysoup.options import OptionsError

FOREIGN = "foreign"  # init.strategy of an imported checkpoint


@dataclass(frozen=True)
class Imported:
    checkpoint: Path
    meta: CheckpointMeta
    added: bool  # False: the same weights were already there


def _arch(arch: str | None, weights: ForeignWeights) -> str:
    chosen = arch or (
        weights.architecture if (weights.architecture or "").startswith("timm:") else None
    )
    if chosen is None:
        raise OptionsError(
            f"{weights.source}: give --arch (one of raysoup's archs or timm:<name>); the "
            f"source does not name a timm architecture"
            + (f" (it says {weights.architecture!r})" if weights.architecture else "")
        )
    try:
        check_arch(chosen)
    except ValueError as error:
        raise OptionsError(f"--arch: {error}") from None
    return chosen


def featurizer_checkpoint(
    source: str | Path,
    *,
    arch: str | None,
    dataset: str | None,
    undeclared: bool = False,
    stage: str = "aux",
    source_format: str | None = None,
    image_size: int | None = None,
) -> tuple[dict[str, Any], CheckpointMeta]:
    """The ``featurizer.*`` tensors and metadata of a foreign checkpoint, checked."""
    if dataset is None and not undeclared:
        raise OptionsError(
            f"{source}: declare the dataset these weights were fine-tuned on (--dataset NAME), "
            f"so that the leakage guard can keep them away from that target; if nobody knows, "
            f"say so with --undeclared (target sweeps then refuse it unless "
            f"allow_undeclared_aux: true, and mark the runs that use it)"
        )
    if dataset is not None and undeclared:
        raise OptionsError(f"--dataset {dataset!r} and --undeclared contradict each other")
    if dataset == UNDECLARED:
        raise OptionsError(f"--dataset {UNDECLARED!r} is reserved; use --undeclared")
    weights = read_weights(source, source_format)
    arch = _arch(arch, weights)
    network = build_network(arch, 1, imagenet=False, image_size=image_size)
    reference = network.featurizer.network.state_dict()
    state = fit_featurizer(weights.state, reference, str(source))
    known = DATASETS.get(dataset or "")
    preprocess = weights.preprocess.resized(image_size) if weights.preprocess else None
    meta = CheckpointMeta(
        dataset=dataset or UNDECLARED,
        envs=list(known.ENVIRONMENTS) if known else [],
        arch=arch,
        num_classes=weights.head_outputs or 1,
        stage=stage,
        test_env=-1,
        hparams=preprocess_record(preprocess, image_size),
        init={
            "strategy": FOREIGN,
            "sources": [],
            "weights": [],
            "source": str(source),
            "source_format": weights.source_format,
            "source_hash": weights.content_hash,
            "declared": dataset is not None,
        },
    )
    return {f"featurizer.network.{k}": v for k, v in state.items()}, meta


def import_featurizer(source: str | Path, out: str | Path, **options: Any) -> Imported:
    """Write the raysoup checkpoint of a foreign featurizer to ``out`` (a pretrained init:
    ``pretrained_weights: OUT``; stage ``base``)."""
    state, meta = featurizer_checkpoint(source, stage="base", **options)
    return Imported(Path(out), save_checkpoint(out, state, meta), True)


def pool_add(pool: str | Path, source: str | Path, **options: Any) -> Imported:
    """Register a foreign fine-tuning in the auxiliary pool folder ``pool``."""
    state, meta = featurizer_checkpoint(source, stage="aux", **options)
    out = Path(pool) / f"{meta.dataset}-{meta.init['source_hash'][:12]}"
    if is_checkpoint(out):
        there = read_meta(out)
        if there.init.get("source_hash") == meta.init["source_hash"] and there.arch == meta.arch:
            return Imported(out, there, False)
        raise CheckpointError(f"{out} already holds another checkpoint; remove it first")
    Path(pool).mkdir(parents=True, exist_ok=True)
    return Imported(out, save_checkpoint(out, state, meta), True)
