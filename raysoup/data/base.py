"""What every dataset looks like to the rest of raysoup: a list of environments."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch.utils.data import Dataset

from raysoup.errors import BadInputError


class DatasetError(BadInputError):
    """A dataset is missing, malformed or unknown; the message names what was expected."""


class TensorEnv(Dataset):
    """An environment held in memory as ``uint8`` images (built-in benchmark).

    ``source_ids`` records where each image came from (``"<source>:<index>"``), which
    lets tests prove that auxiliary, base and target images never overlap.
    """

    def __init__(
        self, name: str, images: torch.Tensor, labels: torch.Tensor, source_ids: list[str]
    ) -> None:
        if not (images.shape[0] == labels.shape[0] == len(source_ids)):
            raise ValueError("images, labels and source_ids must have the same length")
        if images.shape[0] == 0:
            raise DatasetError(f"environment {name!r} is empty")
        self.name = name
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.source_ids = source_ids

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.labels[index])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: the fast path for in-memory data."""
        return self.images[indices].float().div_(255.0), self.labels[indices]


class MultiDomainDataset:
    """A dataset made of environments (domains) sharing one label space.

    Subclasses set the class attributes; ``envs[i]`` is environment ``ENVIRONMENTS[i]``.
    """

    NAME: ClassVar[str]
    ENVIRONMENTS: ClassVar[list[str]]
    NUM_CLASSES: ClassVar[int]
    INPUT_SHAPE: ClassVar[tuple[int, int, int]]
    N_STEPS: ClassVar[int] = 5001
    # DiWA / ModelRatatouille's datasets.py (DomainBed's own says 300): evaluate (and keep
    # the best) every 100 steps; VLCS 50, DomainNet 500.
    CHECKPOINT_FREQ: ClassVar[int] = 100
    DEFAULT_ARCH: ClassVar[str] = "resnet50"
    SMALL_IMAGES: ClassVar[bool] = False  # selects DomainBed's small-image hparam ranges
    IS_BUILTIN: ClassVar[bool] = False

    envs: list[Dataset]
    # Applied to training batches only; evaluation never augments. ``None`` = no transform.
    train_transform: Callable | None = None
    eval_transform: Callable | None = None
    # In-memory envs: applied to whole batches, training and evaluation alike (the model's
    # input size and statistics, ``data.transforms.batch_transform``). ``None``: as stored.
    batch_transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.envs)

    def __getitem__(self, index: int) -> Dataset:
        return self.envs[index]

    def env_sizes(self) -> list[int]:
        return [len(env) for env in self.envs]
