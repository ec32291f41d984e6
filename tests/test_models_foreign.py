"""Foreign models: timm featurizers, checkpoints in timm / torchvision / Hugging Face
formats (generated here with random weights: nothing is downloaded), the key maps and
their refusals, preprocessing that follows the model, ``import-featurizer`` and
``pool add`` with the leakage guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raysoup.cli import main
from raysoup.contract import UNDECLARED
from raysoup.data.registry import load_dataset
from raysoup.data.transforms import Preprocess, recorded_preprocess
from raysoup.io.checkpoint import CheckpointError, load_checkpoint, read_meta
from raysoup.models.convert import featurizer_to_hf_resnet, fit_featurizer, to_featurizer_names
from raysoup.models.foreign import import_featurizer, pool_add
from raysoup.models.networks import arch_preprocess, build_network, check_arch
from raysoup.models.weights import hf_snapshot, read_weights
from raysoup.options import OptionsError
from raysoup.training.inits import LeakageError, discover_aux_pool

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _randomize_bn(module: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that a mapping mistake in them shows."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def _hf_resnet18(num_labels: int = 7) -> torch.nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        layer_type="basic",
        hidden_act="relu",
        downsample_in_first_stage=False,
        num_labels=num_labels,
    )
    model = transformers.ResNetForImageClassification(config).eval()
    _randomize_bn(model)
    return model


@pytest.fixture(scope="module")
def resnet_sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One random ResNet-18 in three formats: a Hugging Face ``save_pretrained`` folder,
    a torchvision state dict (.pth) and a timm state dict (.safetensors)."""
    import torchvision

    root = tmp_path_factory.mktemp("resnet-sources")
    torch.manual_seed(0)
    hf = _hf_resnet18()
    hf.save_pretrained(root / "hf")
    # the same weights in torchvision's names, through the documented map's inverse
    tv = torchvision.models.resnet18(num_classes=7).eval()
    body = {k.removeprefix("resnet."): v for k, v in hf.state_dict().items()}
    tv_state = {}
    for key, value in tv.state_dict().items():
        if key.startswith("fc."):
            tv_state[key] = value
            continue
        (hf_name,) = featurizer_to_hf_resnet({key: value})  # the exporter's inverse map
        tv_state[key] = body[hf_name]
    tv.load_state_dict(tv_state)
    torch.save(tv.state_dict(), root / "torchvision.pth")
    tm = timm.create_model("resnet18", num_classes=7).eval()
    tm.load_state_dict(tv.state_dict())
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, root / "timm.safetensors")
    return {"root": root, "hf": hf, "tv": tv, "timm": tm}


def test_torchvision_timm_and_hf_checkpoints_load_to_the_same_featurizer(resnet_sources):
    root = resnet_sources["root"]
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    built = {
        "hf-as-resnet18": build_network("resnet18", 5, imagenet=True, weights_path=root / "hf"),
        "tv-as-resnet18": build_network(
            "resnet18", 5, imagenet=True, weights_path=root / "torchvision.pth"
        ),
        "timm-as-timm": build_network(
            "timm:resnet18", 5, imagenet=True, weights_path=root / "timm.safetensors"
        ),
        "hf-as-timm": build_network("timm:resnet18", 5, imagenet=True, weights_path=root / "hf"),
    }
    states = {name: net.featurizer.network.state_dict() for name, net in built.items()}
    first = states["hf-as-resnet18"]
    for name, state in states.items():
        assert list(state) == list(first), name  # timm's ResNet names are torchvision's
        for key, tensor in state.items():
            assert tensor.equal(first[key]), (name, key)
    with torch.no_grad():
        # each source's own network, as its library runs it
        hf_features = resnet_sources["hf"].resnet(x).pooler_output.flatten(1)
        tv = resnet_sources["tv"]
        tv_features = torch.nn.Sequential(*list(tv.children())[:-1])(x).flatten(1)
        timm_features = resnet_sources["timm"].forward_head(
            resnet_sources["timm"].forward_features(x), pre_logits=True
        )
        head = torch.nn.Linear(512, 5)
        logits = {}
        for name, net in built.items():
            net.eval()
            net.classifier.load_state_dict(head.state_dict())
            features = net.featurizer(x)
            for reference in (hf_features, tv_features, timm_features):
                assert torch.equal(features, reference), name
            logits[name] = net(x)
    for name, value in logits.items():
        assert torch.equal(value, logits["hf-as-resnet18"]), name


def test_hf_vit_maps_to_timm_vit_exactly(tmp_path: Path) -> None:
    reference = timm.create_model("test_vit", num_classes=0)
    config = transformers.ViTConfig(
        hidden_size=reference.embed_dim,
        num_hidden_layers=len(reference.blocks),
        num_attention_heads=reference.blocks[0].attn.num_heads,
        intermediate_size=reference.blocks[0].mlp.fc1.out_features,
        image_size=160,
        patch_size=16,
        layer_norm_eps=reference.norm.eps,  # HF's default 1e-12 would differ in the last bits
        num_labels=3,
    )
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(config).eval()
    hf.save_pretrained(tmp_path / "hf-vit")
    weights = read_weights(tmp_path / "hf-vit")
    assert weights.source_format == "hf-vit" and weights.head_outputs == 3
    net = build_network("timm:test_vit", 4, imagenet=True, weights_path=tmp_path / "hf-vit")
    net.eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(net.featurizer(x), hf.vit(x).last_hidden_state[:, 0])
    # another input size: timm's own filter resamples the position embeddings
    small = build_network(
        "timm:test_vit", 4, imagenet=True, weights_path=tmp_path / "hf-vit", image_size=32
    )
    assert small.featurizer.network.pos_embed.shape[1] == 1 + 2 * 2
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_a_checkpoint_that_does_not_fit_names_the_offending_key(resnet_sources) -> None:
    root = resnet_sources["root"]
    with pytest.raises(CheckpointError, match=r"layer4\.0\.conv3\.weight|conv3"):
        build_network("resnet50", 5, imagenet=True, weights_path=root / "torchvision.pth")
    state = read_weights(root / "torchvision.pth").state
    reference = {k: v.clone() for k, v in state.items()}
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(CheckpointError, match=r"'layer1\.0\.conv1\.weight' has shape"):
        fit_featurizer(state, reference, "x.pth")
    state = dict(reference, extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match="'extra' is not part of the featurizer"):
        fit_featurizer(state, reference, "x.pth")
    with pytest.raises(CheckpointError, match="no mapping to the featurizer"):
        to_featurizer_names(
            {
                "embedder.embedder.convolution.weight": torch.zeros(1),
                "encoder.mystery.weight": torch.zeros(1),
            },
            "hf",
        )


def test_pickled_code_in_a_bin_file_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv1.weight": torch.zeros(1), "evil": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_weights(tmp_path)


def test_hf_cache_entries_resolve_to_their_snapshot(resnet_sources, tmp_path: Path) -> None:
    entry = tmp_path / "models--acme--resnet18"
    snapshot = entry / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(resnet_sources["root"] / "hf", snapshot)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    assert hf_snapshot(entry) == snapshot
    assert read_weights(entry).content_hash == read_weights(snapshot).content_hash


def test_preprocessing_follows_the_model(tmp_path: Path) -> None:
    check_arch("timm:test_vit")
    check_arch("timm:test_vit.r160_in1k")  # a pretrained tag names weights, not a model
    with pytest.raises(ValueError, match="did you mean timm:test_vit"):
        check_arch("timm:test_vitt")
    with pytest.raises(ValueError, match="'nonet'"):
        check_arch("nonet")
    cfg = timm.get_pretrained_cfg("test_vit")
    pre = arch_preprocess("timm:test_vit", on_disk=True)
    assert pre.size == cfg.input_size[-1] and pre.mean == tuple(cfg.mean)
    assert arch_preprocess("timm:test_vit", on_disk=False, image_size=32).size == 32
    assert arch_preprocess("cnn", on_disk=False) is None
    assert arch_preprocess("resnet18", on_disk=False) is None  # built-in images as stored
    assert arch_preprocess("resnet18", on_disk=True) == Preprocess()
    # a Hub folder's own config wins over timm's defaults
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architecture": "test_vit",
                "pretrained_cfg": {
                    "input_size": [3, 96, 96],
                    "mean": [0.1, 0.2, 0.3],
                    "std": [0.4, 0.5, 0.6],
                    "interpolation": "bicubic",
                },
            }
        )
    )
    declared = arch_preprocess("timm:test_vit", on_disk=True, weights_path=folder)
    assert declared == Preprocess(96, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic")
    # the built-in images, resized and normalized batch by batch
    dataset = load_dataset("MiniRotatedMNIST", preprocess=Preprocess(32, (0.5,) * 3, (0.5,) * 3))
    from raysoup.data.loaders import eval_batches

    x, _ = next(eval_batches(dataset, 0, torch.arange(4).numpy()))
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1.0001 and x.max() <= 1.0001
    assert recorded_preprocess({"preprocess": declared.to_dict()}) == declared


def test_pool_add_records_the_declared_data_and_the_guard_uses_it(
    resnet_sources, tmp_path: Path
) -> None:
    root = resnet_sources["root"]
    pool = tmp_path / "pool"
    added = pool_add(pool, root / "hf", arch="resnet18", dataset="AuxRotationFlip")
    assert added.added and added.checkpoint.parent == pool
    again = pool_add(pool, root / "hf", arch="resnet18", dataset="AuxRotationFlip")
    assert not again.added and again.checkpoint == added.checkpoint  # idempotent
    state, meta = load_checkpoint(added.checkpoint)
    assert meta.dataset == "AuxRotationFlip" and meta.init["declared"] is True
    assert meta.init["source_format"] == "hf-resnet" and meta.stage == "aux"
    assert all(k.startswith("featurizer.network.") for k in state)  # no head taken
    expected = read_weights(root / "torchvision.pth").state
    for key, tensor in expected.items():
        assert state[f"featurizer.network.{key}"].equal(tensor), key
    # declared on the target: the guard keeps it out
    pool_add(pool, root / "timm.safetensors", arch="resnet18", dataset="MiniRotatedMNIST")
    with pytest.warns(UserWarning, match="leakage guard"):
        found = discover_aux_pool([pool], "MiniRotatedMNIST")
    assert list(found.runs) == ["AuxRotationFlip"] and len(found.excluded) == 1
    # not declared: refused at once unless explicit, then refused by sweeps unless allowed
    with pytest.raises(OptionsError, match="declare the dataset"):
        pool_add(pool, root / "torchvision.pth", arch="resnet18", dataset=None)
    undeclared = pool_add(
        pool, root / "torchvision.pth", arch="resnet18", dataset=None, undeclared=True
    )
    assert read_meta(undeclared.checkpoint).dataset == UNDECLARED
    with pytest.raises(LeakageError, match="undeclared training data"):
        discover_aux_pool([pool], "MiniRotatedMNIST")
    with pytest.warns(UserWarning, match="leakage guard"):
        allowed = discover_aux_pool([pool], "MiniRotatedMNIST", allow_undeclared=True)
    assert allowed.undeclared == [str(undeclared.checkpoint)]


def test_import_featurizer_writes_a_pretrained_init(resnet_sources, tmp_path: Path) -> None:
    root = resnet_sources["root"]
    out = tmp_path / "imported"
    done = import_featurizer(root / "hf", out, arch="timm:resnet18", dataset=None, undeclared=True)
    assert done.meta.stage == "base" and done.meta.arch == "timm:resnet18"
    # usable as pretrained_weights: the same featurizer as reading the source directly
    a = build_network("timm:resnet18", 3, imagenet=True, weights_path=out)
    b = build_network("timm:resnet18", 3, imagenet=True, weights_path=root / "hf")
    for (k, va), vb in zip(
        a.featurizer.state_dict().items(), b.featurizer.state_dict().values(), strict=True
    ):
        assert va.equal(vb), k


def test_cli_pool_add_and_import_featurizer(resnet_sources, tmp_path: Path, capsys) -> None:
    root = resnet_sources["root"]
    pool = tmp_path / "pool"

    def pool_add_cli(*options: str) -> int:
        return main(["pool", "add", str(pool), "--from", str(root / "hf"), *options])

    assert pool_add_cli("--arch", "resnet18") == 2
    assert "declare the dataset" in capsys.readouterr().err
    assert pool_add_cli("--arch", "resnet50", "--dataset", "PACS") == 2
    assert "the featurizer" in capsys.readouterr().err
    assert not pool.exists() or not any(pool.iterdir())  # nothing written by a refusal
    assert pool_add_cli("--arch", "resnet18", "--dataset", "PACS") == 0
    assert "added:" in capsys.readouterr().out
    assert pool_add_cli("--arch", "resnet18", "--dataset", "PACS") == 0
    assert "already in the pool" in capsys.readouterr().out
    out = str(tmp_path / "f")
    assert main(["import-featurizer", str(root / "hf"), "--out", out]) == 2
    assert "give --arch" in capsys.readouterr().err
    assert main(["import-featurizer", str(root / "hf"), "--arch", "resnet18", "--out", out]) == 0
    assert read_meta(tmp_path / "f").init["source_format"] == "hf-resnet"


def test_weights_are_never_fetched_by_runs_and_fetch_weights_says_why_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from conftest import minirotated

    with pytest.raises(OptionsError, match="raysoup fetch-weights timm:test_vit"):
        minirotated(arch="timm:test_vit")
    with pytest.raises(OptionsError, match="did you mean timm:test_vit"):
        minirotated(arch="timm:test_vitt", pretrained_weights=tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no lookup leaves this machine
    assert main(["fetch-weights", "timm:test_vit", str(tmp_path / "w")]) == 5
    err = capsys.readouterr().err
    assert "timm/test_vit" in err and "copy a save_pretrained folder" in err
    assert main(["fetch-weights", "resnet18", str(tmp_path / "w")]) == 2


def test_a_missing_models_extra_names_the_install_command(monkeypatch) -> None:
    import sys

    from raysoup.models.networks import MissingExtraError

    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'raysoup\[models\]'"):
        check_arch("timm:test_vit")


def test_a_foreign_pool_of_another_network_is_refused_while_planning(
    resnet_sources, tmp_path: Path
) -> None:
    from conftest import minirotated

    from raysoup.sweep.plan import plan_sweep

    pool = tmp_path / "pool"
    pool_add(pool, resnet_sources["root"] / "hf", arch="resnet18", dataset="AuxRotationFlip")
    config = minirotated(aux_datasets=[], aux_dirs=[str(pool)])  # MiniRotatedMNIST: cnn
    with pytest.raises(OptionsError, match="holds a resnet18 featurizer, this sweep trains cnn"):
        plan_sweep(config, tmp_path / "sweep")
    with pytest.raises(OptionsError, match="aux_dirs: 'nowhere' is not a folder"):
        minirotated(aux_datasets=[], aux_dirs=["nowhere"])
