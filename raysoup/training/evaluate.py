"""Accuracy of a network on every environment's in/out split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from raysoup.data.base import MultiDomainDataset
from raysoup.data.loaders import Batch, eval_batches
from raysoup.data.splits import EnvSplit, Part, id_val_parts, test_parts


@torch.no_grad()
def count_correct(
    network: nn.Module, batches: Iterable[Batch], device: torch.device, amp: bool = False
) -> tuple[int, int]:
    """``(correct, total)`` over the batches; the network is put in eval mode, then every
    module gets its own mode back (a frozen featurizer stays in eval mode in a train-mode
    network: ``network.train()`` would switch its BatchNorm statistics back on)."""
    modes = [(module, module.training) for module in network.modules()]
    network.eval()
    correct = total = 0
    try:
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = network(x)
            correct += int((logits.argmax(dim=1) == y).sum())
            total += int(y.numel())
    finally:
        for module, training in modes:
            module.training = training
    return correct, total


def pooled_accuracy(counts: Iterable[tuple[int, int]]) -> float:
    """Accuracy of the union of parts from their ``(correct, total)``; ``nan`` if empty."""
    correct = total = 0
    for c, t in counts:
        correct, total = correct + c, total + t
    return correct / total if total else float("nan")


def evaluate_splits(
    network: nn.Module,
    dataset: MultiDomainDataset,
    splits: Sequence[EnvSplit],
    test_env: int,
    device: torch.device,
    *,
    batch_size: int = 256,
    amp: bool = False,
    num_workers: int = 0,
) -> dict[str, float]:
    """``env{i}_in_acc``, ``env{i}_out_acc`` for every env, plus the pooled accuracies
    ``id_val_acc`` (``data.splits.id_val_parts``) and ``test_acc`` (``test_parts``;
    ``nan`` when there is no test env)."""
    metrics: dict[str, float] = {}
    counts: dict[Part, tuple[int, int]] = {}
    for split in splits:
        for part in ("in", "out"):
            indices = split.part(part)
            batches = eval_batches(
                dataset, split.env_index, indices, batch_size, num_workers=num_workers
            )
            counts[(split.env_index, part)] = count_correct(network, batches, device, amp)
            metrics[f"env{split.env_index}_{part}_acc"] = pooled_accuracy(
                [counts[(split.env_index, part)]]
            )
    splits = list(splits)
    metrics["id_val_acc"] = pooled_accuracy(counts[p] for p in id_val_parts(splits, test_env))
    metrics["test_acc"] = pooled_accuracy(counts[p] for p in test_parts(splits, test_env))
    return metrics
