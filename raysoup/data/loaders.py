"""Batches: endless seeded training batches per environment, and evaluation passes.

In-memory environments (``TensorEnv``) are indexed directly, a whole batch at a time;
on-disk ones go through a ``DataLoader`` with worker processes. Sampling is with
replacement, as DomainBed's ``InfiniteDataLoader`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from raysoup.data.base import MultiDomainDataset, TensorEnv

Batch = tuple[torch.Tensor, torch.Tensor]


class _IndexedView(Dataset):
    """``env[indices[i]]`` with a transform applied to the image."""

    def __init__(self, env: Dataset, indices: np.ndarray, transform: Callable | None) -> None:
        self.env, self.indices, self.transform = env, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        x, y = self.env[int(self.indices[i])]
        return (self.transform(x) if self.transform else x), y


class _EndlessBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield torch.randint(self.n, (self.batch_size,), generator=generator).tolist()


def _in_memory(dataset: MultiDomainDataset, batch: Batch) -> Batch:
    x, y = batch
    return (dataset.batch_transform(x), y) if dataset.batch_transform else (x, y)


def train_batches(
    dataset: MultiDomainDataset,
    env_index: int,
    indices: np.ndarray,
    batch_size: int,
    seed: int,
    *,
    augment: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """An endless stream of random batches (with replacement) from ``env[indices]``."""
    env = dataset.envs[env_index]
    if len(indices) == 0:
        raise ValueError(f"environment {env_index} has an empty training split")
    if isinstance(env, TensorEnv):
        index_tensor = torch.as_tensor(indices)
        generator = torch.Generator().manual_seed(seed)
        while True:
            pick = torch.randint(len(index_tensor), (batch_size,), generator=generator)
            yield _in_memory(dataset, env.batch(index_tensor[pick]))
    transform = dataset.train_transform if augment else dataset.eval_transform
    loader = DataLoader(
        _IndexedView(env, indices, transform),
        batch_sampler=_EndlessBatchSampler(len(indices), batch_size, seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    yield from loader


def eval_batches(
    dataset: MultiDomainDataset,
    env_index: int,
    indices: np.ndarray,
    batch_size: int = 256,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """One pass over ``env[indices]`` in order, never augmented."""
    env = dataset.envs[env_index]
    if isinstance(env, TensorEnv):
        index_tensor = torch.as_tensor(indices)
        for start in range(0, len(index_tensor), batch_size):
            yield _in_memory(dataset, env.batch(index_tensor[start : start + batch_size]))
        return
    loader = DataLoader(
        _IndexedView(env, indices, dataset.eval_transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    yield from loader
