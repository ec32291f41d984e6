"""The built-in benchmark's foundation network: pretrained once, shipped in the package.

It plays ImageNet's part for the built-in benchmark: a featurizer pretrained on broad
data that never contains a target or auxiliary image — Latin letters and symbols from
22 fonts (no digit, no Greek letter), each rendered under random nuisances of every
kind the benchmark uses (rotation, stroke, ink and paper colour, photographic
backgrounds, blur, noise), far more broadly than any target environment.

``experiments/build_foundation.py`` trains it with :func:`train_foundation` (fixed
seeds: the same weights on the same machine) and writes the checkpoint to
:func:`foundation_dir`, a raysoup checkpoint folder inside the package; its content hash
is checked on every load like any checkpoint's. No run ever pays for pretraining.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysoup.data.render import LATIN, SYMBOLS, Style, glyph_masks, render
from raysoup.io.checkpoint import CheckpointMeta, save_checkpoint
from raysoup.models.networks import build_network
from raysoup.seeding import seed_hash

FOUNDATION_DATASET = "BaseGlyphs"  # the name recorded in the checkpoint's metadata
FOUNDATION_CHARS = LATIN + SYMBOLS
FOUNDATION_STYLE = Style(
    rotation=(-50, 50),
    scale=(0.75, 1.15),
    shift=0.1,
    stroke=(0, 2),
    ink_hue=(0.0, 1.0),
    ink_saturation=(0.0, 1.0),
    ink_value=(0.0, 1.0),
    paper_value=(0.0, 1.0),
    paper_tint=0.6,
    texture=(0.0, 0.9),
    blur=(0.0, 0.7),
    noise=(0.0, 0.14),
)


def foundation_dir() -> Path:
    """The shipped foundation checkpoint (``model.safetensors`` + ``raysoup.json``)."""
    return Path(__file__).parent / "foundation"


@dataclass(frozen=True)
class FoundationRecipe:
    """Everything that determines the foundation's weights."""

    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    renders_per_glyph: int = 64  # size of the pre-rendered pool: glyphs x renders
    seed: int = 0


def rendered_pool(renders: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every foundation glyph rendered ``renders`` times under random nuisances."""
    masks, labels, _ = glyph_masks(FOUNDATION_CHARS)
    images = [
        render(masks, FOUNDATION_STYLE, seed_hash("foundation", seed, k)) for k in range(renders)
    ]
    return torch.cat(images), labels.repeat(renders)


@torch.no_grad()
def _accuracy(network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    network.eval()
    correct = 0
    for start in range(0, len(labels), 512):
        x = images[start : start + 512].float().div_(255)
        correct += int((network(x).argmax(1) == labels[start : start + 512]).sum())
    network.train()
    return correct / len(labels)


def evaluate_foundation(network: nn.Module, seed: int = 12345) -> float:
    """Glyph accuracy on two fresh renders of every foundation glyph (never trained on)."""
    images, labels = rendered_pool(2, seed)
    return _accuracy(network, images, labels)


def train_foundation(
    recipe: FoundationRecipe, log: Callable[[str], None] = print
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the foundation on CPU (deterministic); returns its state dict and metrics
    (``val_acc``: accuracy on a fresh render of every glyph, never trained on)."""
    started = time.time()
    torch.manual_seed(recipe.seed)
    images, labels = rendered_pool(recipe.renders_per_glyph, recipe.seed)
    val_images, val_labels = rendered_pool(2, recipe.seed + 1)
    network = build_network("glyphcnn", len(FOUNDATION_CHARS))
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
    )
    generator = torch.Generator().manual_seed(seed_hash("foundation-batches", recipe.seed))
    loss_fn = nn.CrossEntropyLoss()
    for step in range(recipe.steps):
        pick = torch.randint(len(labels), (recipe.batch_size,), generator=generator)
        loss = loss_fn(network(images[pick].float().div_(255)), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0 or step + 1 == recipe.steps:
            log(
                f"foundation step {step + 1}/{recipe.steps} loss {loss.item():.3f} "
                f"val_acc {_accuracy(network, val_images, val_labels):.4f} "
                f"({time.time() - started:.0f} s)"
            )
    metrics = {
        "val_acc": _accuracy(network, val_images, val_labels),
        "train_acc": _accuracy(network, images[:20000], labels[:20000]),
        "wall_s": time.time() - started,
    }
    return {k: v.detach().clone() for k, v in network.state_dict().items()}, metrics


def save_foundation(
    state: dict[str, torch.Tensor], metrics: dict[str, Any], recipe: FoundationRecipe, out: Path
) -> CheckpointMeta:
    meta = CheckpointMeta(
        dataset=FOUNDATION_DATASET,
        envs=["random-nuisances"],
        arch="glyphcnn",
        num_classes=len(FOUNDATION_CHARS),
        stage="base",
        test_env=-1,
        hparams=asdict(recipe),
        init={"strategy": "scratch", "sources": [], "weights": []},
        metrics=metrics,
    )
    return save_checkpoint(out, state, meta)
