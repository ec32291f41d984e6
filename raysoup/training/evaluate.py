"""Accuracy of a network on every environment's in/out split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from raysoup.data.base import MultiDomainDataset
from raysoup.data.loaders import Batch, eval_batches
from raysoup.data.splits import EnvSplit


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
    """``env{i}_in_acc``, ``env{i}_out_acc`` for every env, plus the pooled accuracies.

    - ``id_val_acc``: accuracy on the *union* of the ``out`` splits of the training envs
      (the number the greedy soup uses both to sort and to accept);
    - ``test_acc``: accuracy on the whole held-out env (in + out), as the DiWA and
      ratatouille soup scripts report it; ``nan`` when there is no test env.
    """
    metrics: dict[str, float] = {}
    val_correct = val_total = 0
    test_correct = test_total = 0
    for split in splits:
        for part, indices in (("in", split.in_indices), ("out", split.out_indices)):
            batches = eval_batches(
                dataset, split.env_index, indices, batch_size, num_workers=num_workers
            )
            correct, total = count_correct(network, batches, device, amp)
            metrics[f"env{split.env_index}_{part}_acc"] = correct / total if total else float("nan")
            if split.env_index == test_env:
                test_correct, test_total = test_correct + correct, test_total + total
            elif part == "out":
                val_correct, val_total = val_correct + correct, val_total + total
    metrics["id_val_acc"] = val_correct / val_total if val_total else float("nan")
    metrics["test_acc"] = test_correct / test_total if test_total else float("nan")
    return metrics
