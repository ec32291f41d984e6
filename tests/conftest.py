"""Shared fixtures. Every test runs with outbound network blocked (loopback stays open)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
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


N_SOUP_TRIALS = 6


def _train_target(out: Path, hparams_seed: int, base: Path, steps: int = 30) -> None:
    """One short real target trial of MiniRotatedMNIST (test env 5, trial seed 0)."""
    from raysoup.training.trainer import RunSpec, train_run

    spec = RunSpec(
        dataset="MiniRotatedMNIST",
        out=out,
        test_env=5,
        hparams_seed=hparams_seed,
        steps=steps,
        checkpoint_freq=steps,
        hparams={"lp_steps": 0},
        pretrained=base,
        device="cpu",
    )
    train_run(spec)


@pytest.fixture(scope="session")
def soup_trials(tmp_path_factory: pytest.TempPathFactory, base_checkpoint: Path) -> list:
    """Six real target trials of one soup group (hparams seeds 0..5), trained once."""
    from raysoup.soup.group import Offer

    root = tmp_path_factory.mktemp("soup-trials")
    offers = []
    for h in range(N_SOUP_TRIALS):
        path = root / f"target-h{h}"
        _train_target(path, h, base_checkpoint)
        offers.append(Offer.from_checkpoint(f"target-h{h}", path))
    return offers


@pytest.fixture(scope="session")
def train_target() -> Callable[..., None]:
    """``train_target(out, hparams_seed, base, steps=30)``: one short real target trial."""
    return _train_target
