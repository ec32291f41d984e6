from __future__ import annotations

import socket
import urllib.request

import pytest
import torch

from raysoup.models.networks import (
    WeightsUnavailableError,
    build_network,
    imagenet_cache_path,
)


def test_network_has_an_explicit_featurizer_classifier_split() -> None:
    net = build_network("cnn", 5)
    keys = net.state_dict().keys()
    assert all(k.startswith(("featurizer.", "classifier.")) for k in keys)
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 5)


def test_resnet_featurizer_frozen_bn_and_domainbed_keys() -> None:
    net = build_network("resnet18", 7, dropout=0.5)
    assert "featurizer.network.conv1.weight" in net.state_dict()  # DomainBed/DiWA key names
    net.train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert net.featurizer.dropout.training
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    unfrozen = build_network("resnet18", 7, freeze_bn=False).train()
    assert all(m.training for m in unfrozen.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_imagenet_weights_from_an_explicit_file(tmp_path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    net = build_network("resnet18", 3, imagenet=True, weights_path=tmp_path / "r18.pth")
    torch.testing.assert_close(
        net.featurizer.network.conv1.weight, reference.conv1.weight, rtol=0, atol=0
    )


def test_offline_without_weights_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError, match="not available offline") as info:
        build_network("resnet50", 3, imagenet=True)
    assert str(imagenet_cache_path(50)) in str(info.value)


def test_network_is_blocked_in_tests() -> None:
    with pytest.raises(OSError, match="may not use the network"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    with pytest.raises(OSError):
        urllib.request.urlopen("http://1.1.1.1", timeout=1)


def test_imagenet_weights_from_the_torch_cache(tmp_path, monkeypatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = torchvision.models.resnet18(weights=None)
    cached = imagenet_cache_path(18)
    assert str(cached).startswith(str(tmp_path))
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    net = build_network("resnet18", 3, imagenet=True)
    assert torch.equal(
        net.featurizer.network.layer4[1].conv2.weight, reference.layer4[1].conv2.weight
    )
