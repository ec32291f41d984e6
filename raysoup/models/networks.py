"""Networks: a featurizer and a classifier head, kept explicitly apart.

State-dict keys are ``featurizer.*`` and ``classifier.*``. The ResNet featurizer keeps
torchvision's module under ``featurizer.network`` like DomainBed/DiWA, so their
checkpoints map onto ours key for key; ``timm:<name>`` keeps timm's model (built with
``num_classes=0``) under ``featurizer.network`` too. Foreign weights (timm, torchvision,
Hugging Face) are renamed by ``raysoup.models.convert`` and checked by shape.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from raysoup.data.transforms import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocess
from raysoup.errors import EnvironmentProblemError
from raysoup.io.checkpoint import CheckpointError
from raysoup.models.convert import fit_featurizer
from raysoup.models.weights import ForeignWeights, declared_preprocess_at, read_weights

if TYPE_CHECKING:
    import torchvision

ARCHS = ("cnn", "glyphcnn", "resnet18", "resnet50")
SMALL_ARCHS = ("cnn", "glyphcnn")  # pretrained on built-in data, not ImageNet
TIMM_PREFIX = "timm:"  # ``timm:<name>``: any timm architecture as the featurizer


class WeightsUnavailableError(EnvironmentProblemError):
    """Pretrained weights could not be found offline nor downloaded."""


class MissingExtraError(EnvironmentProblemError):
    """An optional dependency (``raysoup[models]``) is not installed."""


def import_timm() -> Any:
    try:
        import timm
    except ImportError as error:
        raise MissingExtraError(
            f"timm architectures need timm ({error}): pip install 'raysoup[models]'"
        ) from error
    return timm


def timm_name(arch: str) -> str | None:
    """``name`` of ``timm:name``; ``None`` for raysoup's own architectures."""
    return arch[len(TIMM_PREFIX) :] if arch.startswith(TIMM_PREFIX) else None


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` naming ``arch`` unless it is one of ``ARCHS`` or a timm model."""
    if arch in ARCHS:
        return
    name = timm_name(arch)
    if not name:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS} or 'timm:<name>'")
    known = import_timm().list_models()
    if name.split(".")[0] not in known:  # ``convnext_tiny.fb_in1k``: a tag names weights
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"arch {arch!r}: timm has no model {name!r}{hint}")


def arch_preprocess(
    arch: str,
    *,
    on_disk: bool,
    image_size: int | None = None,
    weights_path: str | Path | None = None,
    default_size: int = 224,
) -> Preprocess | None:
    """The input a featurizer expects (``None``: the images as the dataset stores them).

    - ``cnn`` / ``glyphcnn``: ``None``.
    - ``resnet18`` / ``resnet50``: ImageNet's statistics at ``default_size`` for on-disk
      images (DomainBed's); the built-in images as they are unless ``image_size`` is set.
    - ``timm:<name>``: the pretrained config's size and statistics, replaced by those the
      weights' folder declares (``config.json`` / ``preprocessor_config.json``).

    ``image_size`` overrides the size in every case (the built-in images are 16x16: a timm
    model is fed them resized to its size unless told otherwise).
    """
    if arch in SMALL_ARCHS:
        return None
    name = timm_name(arch)
    if name is None:
        if not on_disk and image_size is None:
            return None
        return Preprocess(default_size, IMAGENET_MEAN, IMAGENET_STD).resized(image_size)
    declared = declared_preprocess_at(weights_path) if weights_path is not None else None
    if declared is not None:
        return declared.resized(image_size)
    cfg = import_timm().get_pretrained_cfg(name)
    if cfg is None:
        return Preprocess(default_size).resized(image_size)
    interpolation = cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bilinear"
    return Preprocess(
        int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std), interpolation
    ).resized(image_size)


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
    """ResNet weights (torchvision names) from an explicit file or folder in any format
    ``read_weights`` reads (torchvision, timm, Hugging Face, raysoup), the torch cache, or
    a download of torchvision's ImageNet weights.

    Set ``RAYSOUP_OFFLINE=1`` to never try the download.
    """
    if weights_path is not None:
        return read_weights(weights_path).state
    cached = imagenet_cache_path(depth)
    if cached.is_file():
        return read_weights(cached).state
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
        self.n_outputs = self.network.fc.in_features
        self.network.fc = nn.Identity()
        if pretrained:
            state = load_imagenet_state_dict(depth, weights_path)
            source = str(weights_path or imagenet_cache_path(depth))
            self.network.load_state_dict(fit_featurizer(state, self.network.state_dict(), source))
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


class TimmFeaturizer(nn.Module):
    """A timm model built with ``num_classes=0`` (pooled features out), plus dropout;
    BatchNorm optionally frozen (where the architecture has any).

    ``image_size`` is passed to models that take one (ViTs: ``img_size``); pretrained
    weights come from ``weights`` (``read_weights``), never from the network: a ViT's
    position embeddings are resampled to ``image_size`` by timm's own checkpoint filter.
    """

    def __init__(
        self,
        name: str,
        weights: ForeignWeights | None = None,
        dropout: float = 0.0,
        freeze_bn: bool = True,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        timm = import_timm()
        try:
            sized = {"img_size": image_size} if image_size else {}
            self.network = timm.create_model(name, pretrained=False, num_classes=0, **sized)
        except TypeError:  # a model without an input size (convnets take any size)
            self.network = timm.create_model(name, pretrained=False, num_classes=0)
        self.n_outputs = int(self.network.num_features)
        self.dropout = nn.Dropout(dropout)
        self.freeze_bn = freeze_bn
        if weights is not None:
            self.network.load_state_dict(self._fit(weights))
        self.train()

    def _fit(self, weights: ForeignWeights) -> dict[str, torch.Tensor]:
        reference = self.network.state_dict()
        try:
            return fit_featurizer(weights.state, reference, weights.source)
        except CheckpointError as error:
            if "has shape" not in str(error):
                raise
            # e.g. a ViT's position embeddings at another input size: timm's filter converts
            module = sys.modules[type(self.network).__module__]
            filter_fn = getattr(module, "checkpoint_filter_fn", None)
            if filter_fn is None:
                raise
            converted = filter_fn(dict(weights.state), self.network)
            return fit_featurizer(converted, reference, weights.source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.network(x))

    def train(self, mode: bool = True) -> TimmFeaturizer:
        super().train(mode)
        if self.freeze_bn:
            for module in self.network.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def timm_weights(arch: str, weights_path: str | Path | None) -> ForeignWeights:
    """The pretrained weights of ``timm:<name>``: always a local file or folder."""
    if weights_path is None:
        raise WeightsUnavailableError(
            f"arch {arch!r}: pretrained weights are read from a local file or folder; set "
            f"`pretrained_weights: PATH` (a timm or Hugging Face weights file, a "
            f"save_pretrained folder or a Hugging Face cache entry). Where there is internet, "
            f"`raysoup fetch-weights {arch} DIR` downloads them once into DIR"
        )
    return read_weights(weights_path)


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
    image_size: int | None = None,
) -> Network:
    """A fresh network. ``imagenet`` loads the pretrained weights into a ResNet or timm
    featurizer (``weights_path``; for ResNets, else torchvision's ImageNet weights)."""
    name = timm_name(arch)
    if name:
        weights = timm_weights(arch, weights_path) if imagenet else None
        featurizer: nn.Module = TimmFeaturizer(name, weights, dropout, freeze_bn, image_size)
    elif arch in SMALL_ARCHS:
        if imagenet:
            raise ValueError(f"arch {arch!r} has no ImageNet weights; it is pretrained offline")
        small = SmallCNN if arch == "cnn" else GlyphCNN
        featurizer = small(input_channels, dropout)
    elif arch in ("resnet18", "resnet50"):
        featurizer = ResNetFeaturizer(
            int(arch[len("resnet") :]), imagenet, weights_path, dropout, freeze_bn
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS} or 'timm:<name>'")
    return Network(
        featurizer, build_classifier(featurizer.n_outputs, num_classes, nonlinear_classifier)
    )
