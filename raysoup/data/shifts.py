"""Seq-to-Final shift building blocks, as pure functions on image batches.

Images are ``uint8`` tensors of shape ``(N, 3, H, W)`` on the 0..255 scale, labels are
``int64`` tensors of shape ``(N,)``. Each block takes a ``step``: chaining the block
``step`` times is the same as calling it once with that step (the blocks are cumulative).
"""

from __future__ import annotations

import torch

ROTATION_PER_STEP = 30.0
RECOLOUR_PER_STEP = 30


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )


def rotate(images: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """Rotate counter-clockwise by ``degrees`` (one angle or one per image), black fill."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF  # lazy: see data/__init__

    _check_images(images)
    angles = torch.as_tensor(degrees, dtype=torch.float64).expand(images.shape[0])
    out = torch.empty_like(images)
    for angle in angles.unique().tolist():
        mask = angles == angle
        rotated = TF.rotate(
            images[mask].float(), angle, interpolation=InterpolationMode.BILINEAR, fill=[0.0]
        )
        out[mask] = rotated.round().clamp(0, 255).to(torch.uint8)
    return out


def rotation(images: torch.Tensor, step: int) -> torch.Tensor:
    """All classes rotate by +30 degrees per step."""
    return rotate(images, ROTATION_PER_STEP * step)


def class_conditional_rotation(
    images: torch.Tensor, labels: torch.Tensor, step: int
) -> torch.Tensor:
    """Even classes rotate by +30 degrees per step, odd classes by -30."""
    sign = 1.0 - 2.0 * (labels % 2).double()
    return rotate(images, sign * ROTATION_PER_STEP * step)


def _add_to_channel(images: torch.Tensor, channel: torch.Tensor, amount: int) -> torch.Tensor:
    _check_images(images)
    out = images.to(torch.int32)
    index = torch.arange(images.shape[0])
    out[index, channel] += amount
    return out.clamp(0, 255).to(torch.uint8)


def recolour(images: torch.Tensor, step: int) -> torch.Tensor:
    """+30 on the red channel per step, clipped to 0..255."""
    red = torch.zeros(images.shape[0], dtype=torch.int64)
    return _add_to_channel(images, red, RECOLOUR_PER_STEP * step)


def class_conditional_recolour(
    images: torch.Tensor, labels: torch.Tensor, step: int
) -> torch.Tensor:
    """+30 per step on channel ``label % 3``, clipped."""
    return _add_to_channel(images, labels % 3, RECOLOUR_PER_STEP * step)


def corruption(images: torch.Tensor, step: int, amplitude: int, seed: int) -> torch.Tensor:
    """Uniform integer pixel noise in ``[-amplitude*step, amplitude*step]``, clipped."""
    _check_images(images)
    bound = amplitude * step
    if bound == 0:
        return images.clone()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(-bound, bound + 1, images.shape, generator=generator, dtype=torch.int32)
    return (images.to(torch.int32) + noise).clamp(0, 255).to(torch.uint8)


def label_flip(labels: torch.Tensor, num_classes: int, step: int) -> torch.Tensor:
    """Alternately apply ``y -> C-1-y`` (odd steps) and ``y -> (y+2) mod C`` (even steps)."""
    out = labels.clone()
    for s in range(1, step + 1):
        out = (num_classes - 1 - out) if s % 2 == 1 else (out + 2) % num_classes
    return out


def label_shift(labels: torch.Tensor, class_weights: list[float], seed: int) -> torch.Tensor:
    """Indices of a subsample whose class frequencies are re-weighted by ``class_weights``.

    A class of weight ``w`` keeps a fraction ``w / max(weights)`` of its examples.
    """
    weights = torch.as_tensor(class_weights, dtype=torch.float64)
    if weights.min() < 0 or weights.max() <= 0:
        raise ValueError(f"class_weights must be >= 0 with a positive maximum, got {class_weights}")
    keep_fraction = weights / weights.max()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(labels.shape[0], generator=generator, dtype=torch.float64)
    return torch.nonzero(draws < keep_fraction[labels]).flatten()


def subpopulation(
    labels: torch.Tensor, superclass_of: list[int], allowed_subclasses: set[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the examples whose (sub)class is allowed; relabel them to their super-class.

    Returns ``(kept_indices, superclass_labels)``.
    """
    allowed = torch.tensor(sorted(allowed_subclasses), dtype=labels.dtype)
    kept = torch.nonzero(torch.isin(labels, allowed)).flatten()
    mapping = torch.as_tensor(superclass_of, dtype=torch.int64)
    return kept, mapping[labels[kept]]
