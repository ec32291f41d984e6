"""Preprocessing that follows the model: input size, mean and std, and DomainBed's
augmentation at that size.

``Preprocess`` is what a featurizer expects of its input (timm: its pretrained config;
torchvision ResNets: ImageNet's 224 px and statistics). It is recorded in every
checkpoint's ``hparams["preprocess"]``, so that soups and diagnostics feed a model exactly
what it was trained on.

- On-disk image datasets: ``eval_transform`` (resize to ``size``, normalize) and
  ``augment_transform`` (DomainBed's ``RandomResizedCrop(size, scale=(0.7, 1))``, flip,
  colour jitter, grayscale, then normalize) at the model's size and statistics.
- In-memory datasets (the built-in benchmarks: ``uint8`` tensors, 16x16): ``batch_transform``
  resizes whole batches (bilinear) and normalizes them. The small built-in networks take
  the images as they are (``Preprocess`` is ``None`` for them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """What a featurizer expects: ``size`` x ``size`` images normalized by ``mean``/``std``."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and self.size > 0):
            raise ValueError(f"preprocess size={self.size!r}: expected a positive integer")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"preprocess {name}={value!r}: expected 3 numbers (RGB)")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocess std={self.std}: expected positive numbers")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess interpolation={self.interpolation!r}: expected one of {INTERPOLATIONS}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        return cls(
            size=int(data["size"]),
            mean=tuple(data["mean"]),  # type: ignore[arg-type]
            std=tuple(data["std"]),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bilinear")),
        )

    def resized(self, size: int | None) -> Preprocess:
        """The same statistics at another input size (``None``: unchanged)."""
        if size is None or size == self.size:
            return self
        return Preprocess(size, self.mean, self.std, self.interpolation)


def preprocess_record(preprocess: Preprocess | None, image_size: int | None) -> dict[str, Any]:
    """What a checkpoint's ``hparams`` record of its input (read by ``recorded_preprocess``):
    nothing for a network fed the images as stored, so older checkpoints read the same."""
    if preprocess is None and image_size is None:
        return {}
    return {"preprocess": preprocess.to_dict() if preprocess else None, "image_size": image_size}


def recorded_preprocess(hparams: Mapping[str, Any]) -> Preprocess | None:
    """The ``Preprocess`` a checkpoint's ``hparams`` record (``None``: images as stored)."""
    recorded = hparams.get("preprocess")
    return Preprocess.from_dict(recorded) if isinstance(recorded, Mapping) else None


def _mode(preprocess: Preprocess) -> transforms.InterpolationMode:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(preprocess.interpolation)


def eval_transform(preprocess: Preprocess) -> transforms.Compose:
    """PIL image -> normalized tensor at the model's size (evaluation never augments)."""
    from torchvision import transforms  # lazy: importing it costs seconds

    return transforms.Compose(
        [
            transforms.Resize((preprocess.size, preprocess.size), interpolation=_mode(preprocess)),
            transforms.ToTensor(),
            transforms.Normalize(preprocess.mean, preprocess.std),
        ]
    )


def augment_transform(preprocess: Preprocess) -> transforms.Compose:
    """DomainBed's training augmentation, at the model's size and statistics."""
    from torchvision import transforms  # lazy: importing it costs seconds

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                preprocess.size, scale=(0.7, 1.0), interpolation=_mode(preprocess)
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.3),
            transforms.RandomGrayscale(),
            transforms.ToTensor(),
            transforms.Normalize(preprocess.mean, preprocess.std),
        ]
    )


def batch_transform(preprocess: Preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """A whole ``(N, C, H, W)`` batch in [0, 1] -> resized and normalized (in-memory data).

    Grey (1-channel) images are repeated to RGB, as the model's 3-channel stem expects.
    """
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    mode = preprocess.interpolation

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (preprocess.size, preprocess.size):
            align = None if mode == "nearest" else False
            x = F.interpolate(
                x, size=(preprocess.size, preprocess.size), mode=mode, align_corners=align
            )
        return (x - mean) / std

    return apply
