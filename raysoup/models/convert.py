"""Foreign state dicts to raysoup's featurizer names: pure key maps, checked by shape.

A featurizer's own keys are those of the module it wraps (``network.*`` of
``ResNetFeaturizer`` / ``TimmFeaturizer``): torchvision's names for ``resnet18`` /
``resnet50``, timm's names for ``timm:<name>``. What each source format maps to:

============================  ====================================================
source format                 key mapping (``{s}`` stage, ``{l}`` block, ``{k}`` layer)
============================  ====================================================
``raysoup``                   ``featurizer.network.X`` -> ``X`` (a raysoup checkpoint)
``torchvision`` / ``timm``    unchanged (timm's ResNets use torchvision's names);
                              ``module.`` / ``model.`` prefixes are dropped
``hf-resnet``                 (``ResNetModel`` / ``ResNetForImageClassification``)
                              ``[resnet.]embedder.embedder.convolution`` -> ``conv1``,
                              ``...embedder.normalization`` -> ``bn1``,
                              ``[resnet.]encoder.stages.{s}.layers.{l}.shortcut.convolution``
                              -> ``layer{s+1}.{l}.downsample.0``, ``shortcut.normalization``
                              -> ``downsample.1``, ``layers.{l}.layer.{k}.convolution`` ->
                              ``layer{s+1}.{l}.conv{k+1}``, ``layer.{k}.normalization`` ->
                              ``bn{k+1}``
``hf-vit``                    (``ViTModel`` / ``ViTForImageClassification``, to timm's
                              ``VisionTransformer``) ``embeddings.cls_token`` ->
                              ``cls_token``, ``embeddings.position_embeddings`` ->
                              ``pos_embed``, ``embeddings.patch_embeddings.projection`` ->
                              ``patch_embed.proj``, ``encoder.layer.{i}.attention.attention.
                              {query,key,value}`` -> ``blocks.{i}.attn.qkv`` (concatenated
                              in that order), ``attention.output.dense`` -> ``attn.proj``,
                              ``layernorm_before/after`` -> ``norm1/norm2``,
                              ``intermediate.dense`` / ``output.dense`` -> ``mlp.fc1/fc2``,
                              ``layernorm`` -> ``norm``
============================  ====================================================

Classification heads (``fc.*``, ``head.*``, ``classifier.*``, HF's ``pooler.*``) are
dropped: only the featurizer is ever taken from a foreign checkpoint (class counts
differ). ``fit_featurizer`` then requires exactly the reference's keys with its shapes and
names the first offending key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from raysoup.io.validate import CheckpointError

State = dict[str, torch.Tensor]

SOURCE_FORMATS = ("raysoup", "torchvision", "timm", "hf-resnet", "hf-vit")
# Heads of the formats above, never part of a featurizer.
HEAD_PREFIXES = ("fc.", "head.", "head_drop.", "classifier.", "pooler.", "fc_norm.")
WRAPPER_PREFIXES = ("module.", "model.")


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """Which of ``SOURCE_FORMATS`` a state dict is, from its key names."""
    keys = list(state)
    if any(k.startswith("featurizer.") for k in keys):
        return "raysoup"
    if any("embedder.embedder.convolution" in k for k in keys):
        return "hf-resnet"
    if any("embeddings.patch_embeddings.projection" in k for k in keys):
        return "hf-vit"
    return "timm"  # torchvision and timm share names where they share an architecture


def _from_raysoup(state: Mapping[str, torch.Tensor]) -> State:
    featurizer = _strip(state, "featurizer.")
    network = _strip(featurizer, "network.")
    return network or featurizer


_HF_RESNET = [
    (re.compile(r"^embedder\.embedder\.convolution\.(.+)$"), r"conv1.\1"),
    (re.compile(r"^embedder\.embedder\.normalization\.(.+)$"), r"bn1.\1"),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(.+)$"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.{m[3]}",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(.+)$"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.(.+)$"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.{m[4]}",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.(.+)$"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.{m[4]}",
    ),
]

Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]


def _rename(state: Mapping[str, torch.Tensor], rules: list[Rule], source: str) -> State:
    out: State = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = value  # type: ignore[arg-type]
                break
        else:
            if not key.startswith(HEAD_PREFIXES):
                raise CheckpointError(f"{source}: key {key!r} has no mapping to the featurizer")
    return out


def _from_hf_resnet(state: Mapping[str, torch.Tensor], source: str) -> State:
    body = _strip(state, "resnet.") or dict(state)
    return _rename(body, _HF_RESNET, source)


_HF_VIT = [
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\.(.+)$"), r"patch_embed.proj.\1"),
    (
        re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(.+)$"),
        r"blocks.\1.attn.proj.\2",
    ),
    (re.compile(r"^encoder\.layer\.(\d+)\.layernorm_before\.(.+)$"), r"blocks.\1.norm1.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.layernorm_after\.(.+)$"), r"blocks.\1.norm2.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(.+)$"), r"blocks.\1.mlp.fc1.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense\.(.+)$"), r"blocks.\1.mlp.fc2.\2"),
    (re.compile(r"^layernorm\.(.+)$"), r"norm.\1"),
]
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(.+)$")


def _from_hf_vit(state: Mapping[str, torch.Tensor], source: str) -> State:
    body = _strip(state, "vit.") or dict(state)
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest: State = {}
    for key, value in body.items():
        match = _QKV.match(key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            rest[key] = value
    out = _rename(rest, _HF_VIT, source)
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise CheckpointError(
                f"{source}: block {block} has no attention {missing} {kind}: cannot fuse qkv"
            )
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )
    return out


def to_featurizer_names(
    state: Mapping[str, torch.Tensor], source: str, source_format: str | None = None
) -> tuple[State, str]:
    """``state`` renamed to featurizer keys (heads dropped), and the format it was read as."""
    fmt = source_format or detect_format(state)
    if fmt not in SOURCE_FORMATS:
        raise CheckpointError(f"{source}: format {fmt!r} unknown; expected one of {SOURCE_FORMATS}")
    for prefix in WRAPPER_PREFIXES:  # DataParallel's module., Lightning's model.
        if state and all(k.startswith(prefix) for k in state):
            state = _strip(state, prefix)
    if fmt == "raysoup":
        return _from_raysoup(state), fmt
    if fmt == "hf-resnet":
        return _from_hf_resnet(state, source), fmt
    if fmt == "hf-vit":
        return _from_hf_vit(state, source), fmt
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}, fmt


def fit_featurizer(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], source: str
) -> State:
    """``state`` (featurizer names) checked against ``reference`` key by key and shape by
    shape, cast to the reference's dtypes; the first offending key is named."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing:
        raise CheckpointError(
            f"{source}: the featurizer needs {missing[0]!r} (shape "
            f"{tuple(reference[missing[0]].shape)}), which the checkpoint lacks "
            f"({len(missing)} missing key(s)); is it the right architecture?"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: key {unexpected[0]!r} is not part of the featurizer "
            f"({len(unexpected)} unexpected key(s)); is it the right architecture?"
        )
    out: State = {}
    for key, expected in reference.items():
        value = state[key]
        if tuple(value.shape) != tuple(expected.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the featurizer "
                f"expects {tuple(expected.shape)}"
            )
        out[key] = value.to(expected.dtype)
    return out


# ---------------------------------------------------------------- exports (for other tools)


def featurizer_to_hf_resnet(state: Mapping[str, torch.Tensor]) -> State:
    """torchvision ResNet names to ``ResNetModel``'s (the inverse of ``hf-resnet``)."""
    out: State = {}
    for key, value in state.items():
        if key.startswith("conv1."):
            out["embedder.embedder.convolution." + key[6:]] = value
        elif key.startswith("bn1."):
            out["embedder.embedder.normalization." + key[4:]] = value
        elif match := re.match(r"^layer(\d+)\.(\d+)\.downsample\.([01])\.(.+)$", key):
            part = "convolution" if match[3] == "0" else "normalization"
            stage = int(match[1]) - 1
            out[f"encoder.stages.{stage}.layers.{match[2]}.shortcut.{part}.{match[4]}"] = value
        elif match := re.match(r"^layer(\d+)\.(\d+)\.(conv|bn)(\d+)\.(.+)$", key):
            part = "convolution" if match[3] == "conv" else "normalization"
            stage, layer = int(match[1]) - 1, int(match[4]) - 1
            name = f"encoder.stages.{stage}.layers.{match[2]}.layer.{layer}.{part}.{match[5]}"
            out[name] = value
        elif not key.startswith(HEAD_PREFIXES):
            raise CheckpointError(f"key {key!r} has no hf-resnet name")
    return out
