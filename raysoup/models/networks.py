"""Networks: a featurizer and a classifier head, kept explicitly apart.

State-dict keys are ``featurizer.*`` and ``classifier.*``. The ResNet featurizer keeps
torchvision's module under ``featurizer.network`` like DomainBed/DiWA, so their
checkpoints map onto ours key for key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from raysoup.errors import EnvironmentProblemError
from raysoup.io.checkpoint import import_state_dict

if TYPE_CHECKING:
    import torchvision

ARCHS = ("cnn", "glyphcnn", "resnet18", "resnet50")
SMALL_ARCHS = ("cnn", "glyphcnn")  # pretrained on built-in data, not ImageNet


class WeightsUnavailableError(EnvironmentProblemError):
    """Pretrained weights could not be found offline nor downloaded."""


class SmallCNN(nn.Module):
    """The built-in benchmark's featurizer: four conv layers with BatchNorm, 3x16x16 in."""

    n_outputs: ClassVar[int] = 64

    def __init__(self, input_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.network = nn.Sequential(
            *block(input_channels, 32, 1),
            *block(32, 64, 2),
            *block(64, 64, 1),
            *block(64, self.n_outputs, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.network(x))


class GlyphCNN(nn.Module):
    """The nuisance benchmark's featurizer: four 3x3 convolutions with GroupNorm, 3x16x16 in.

    GroupNorm, not BatchNorm: a network without running statistics averages cleanly
    (a soup's BatchNorm statistics are not the statistics of the soup's features), like
    DomainBed's MNIST network. Its pretrained weights are the shipped foundation
    (``raysoup.models.foundation``).
    """

    n_outputs: ClassVar[int] = 128
    widths: ClassVar[tuple[int, ...]] = (32, 64, 96, 128)
    strides: ClassVar[tuple[int, ...]] = (1, 2, 1, 2)

    def __init__(self, input_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = input_channels
        for c_out, stride in zip(self.widths, self.strides, strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.GroupNorm(8, c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.network = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.network(x))


def _imagenet_weights(depth: int) -> torchvision.models.WeightsEnum:
    import torchvision  # lazy: importing it costs seconds (it imports torch._dynamo)

    # IMAGENET1K_V1 is what DomainBed's `resnet50(pretrained=True)` loads.
    if depth == 18:
        return torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    return torchvision.models.ResNet50_Weights.IMAGENET1K_V1


def imagenet_cache_path(depth: int) -> Path:
    """Where torchvision keeps (and raysoup looks for) the ImageNet weights file."""
    url = _imagenet_weights(depth).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_imagenet_state_dict(depth: int, weights_path: str | Path | None = None) -> dict:
    """ImageNet weights from an explicit file, the torch cache, or a download.

    Set ``RAYSOUP_OFFLINE=1`` to never try the download.
    """
    if weights_path is not None:
        return import_state_dict(weights_path)
    cached = imagenet_cache_path(depth)
    if cached.is_file():
        return import_state_dict(cached)
    weights = _imagenet_weights(depth)
    hint = (
        f"ImageNet weights for resnet{depth} are not available offline. Put {weights.url} "
        f"at {cached} (torchvision's cache), or pass an explicit file with "
        f"`pretrained_weights: PATH` / `--pretrained-weights PATH`."
    )
    if os.environ.get("RAYSOUP_OFFLINE") == "1":
        raise WeightsUnavailableError(hint)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # any network failure: urllib, socket, SSL, timeouts
        raise WeightsUnavailableError(f"{hint} (download failed: {error})") from error


class ResNetFeaturizer(nn.Module):
    """torchvision ResNet without its ``fc``, plus dropout; BatchNorm optionally frozen."""

    def __init__(
        self,
        depth: int,
        pretrained: bool,
        weights_path: str | Path | None = None,
        dropout: float = 0.0,
        freeze_bn: bool = True,
    ) -> None:
        super().__init__()
        if depth not in (18, 50):
            raise ValueError(f"ResNet depth must be 18 or 50, got {depth}")
        import torchvision  # lazy: importing it costs seconds (it imports torch._dynamo)

        builder = torchvision.models.resnet18 if depth == 18 else torchvision.models.resnet50
        self.network = builder(weights=None)
        if pretrained:
            state = load_imagenet_state_dict(depth, weights_path)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = self.network.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise WeightsUnavailableError(
                    f"ImageNet weights for resnet{depth} do not fit: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        self.n_outputs = self.network.fc.in_features
        self.network.fc = nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.freeze_bn = freeze_bn
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.network(x))

    def train(self, mode: bool = True) -> ResNetFeaturizer:
        super().train(mode)
        if self.freeze_bn:  # DomainBed: BatchNorm statistics stay those of ImageNet
            for module in self.network.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


class Network(nn.Module):
    """``classifier(featurizer(x))``."""

    def __init__(self, featurizer: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))


def build_classifier(n_features: int, num_classes: int, nonlinear: bool = False) -> nn.Module:
    if not nonlinear:
        return nn.Linear(n_features, num_classes)
    return nn.Sequential(
        nn.Linear(n_features, n_features // 2),
        nn.ReLU(),
        nn.Linear(n_features // 2, n_features // 4),
        nn.ReLU(),
        nn.Linear(n_features // 4, num_classes),
    )


def build_network(
    arch: str,
    num_classes: int,
    *,
    input_channels: int = 3,
    dropout: float = 0.0,
    nonlinear_classifier: bool = False,
    imagenet: bool = False,
    weights_path: str | Path | None = None,
    freeze_bn: bool = True,
) -> Network:
    """A fresh network. ``imagenet`` loads ImageNet weights into a ResNet featurizer."""
    if arch in SMALL_ARCHS:
        if imagenet:
            raise ValueError(f"arch {arch!r} has no ImageNet weights; it is pretrained offline")
        small = SmallCNN if arch == "cnn" else GlyphCNN
        featurizer: nn.Module = small(input_channels, dropout)
    elif arch in ("resnet18", "resnet50"):
        featurizer = ResNetFeaturizer(
            int(arch[len("resnet") :]), imagenet, weights_path, dropout, freeze_bn
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return Network(
        featurizer, build_classifier(featurizer.n_outputs, num_classes, nonlinear_classifier)
    )
