"""Shared fixtures. Every test runs with outbound network blocked (loopback stays open)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NetworkBlockedError(OSError):
    pass


def _is_local(address: object) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0] if isinstance(address, tuple) else None
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: resolving it would already be network use


def _guarded_connect(self: socket.socket, address: object) -> None:
    if not _is_local(address):
        raise NetworkBlockedError(f"tests may not use the network (connect to {address!r})")
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    if not _is_local(address):
        raise NetworkBlockedError(f"tests may not use the network (connect to {address!r})")
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)


@pytest.fixture(scope="session")
def raysoup_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (holding the built-in base network) for the whole session."""
    return tmp_path_factory.mktemp("raysoup-cache")


@pytest.fixture(scope="session")
def base_checkpoint(raysoup_cache: Path) -> Path:
    from raysoup.training.trainer import ensure_base_checkpoint

    return ensure_base_checkpoint(raysoup_cache, device="cpu")


@pytest.fixture(scope="session")
def tiny_domainbed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(data_dir, weights file)``: PACS and VLCS in DomainBed's on-disk layout, with their
    real env folders and class counts but 1 tiny PNG per class and env, and a randomly
    initialised ResNet-18 saved as the "ImageNet" weights file (nothing is downloaded)."""
    import torch
    import torchvision
    from PIL import Image

    from raysoup.data.domainbed import PACS, VLCS

    root = tmp_path_factory.mktemp("domainbed")
    for cls in (PACS, VLCS):
        for e, env in enumerate(cls.ENV_FOLDERS):
            for c in range(cls.NUM_CLASSES):
                folder = root / cls.FOLDER / env / f"class{c}"
                folder.mkdir(parents=True)
                Image.new("RGB", (16, 16), (35 * c, 60 * e, 90)).save(folder / "0.png")
    weights = root / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return root, weights
