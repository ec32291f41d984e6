"""Shared fixtures. Every test runs with outbound network blocked (loopback stays open)."""

from __future__ import annotations

import ipaddress
import socket
import uuid
from collections.abc import Callable, Iterator
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


def _train_target(
    out: Path, hparams_seed: int, base: Path, steps: int = 30, trial_seed: int = 0
) -> None:
    """One short real target trial of MiniRotatedMNIST (test env 5): one evaluation, at
    the end, whose weights it keeps (soup tests want trained trials, cheaply)."""
    from raysoup.training.trainer import RunSpec, train_run

    spec = RunSpec(
        dataset="MiniRotatedMNIST",
        out=out,
        test_env=5,
        trial_seed=trial_seed,
        hparams_seed=hparams_seed,
        steps=steps,
        checkpoint_freq=steps,
        eval_schedule="multiples",
        keep="last",
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
    """``train_target(out, hparams_seed, base, steps=30, trial_seed=0)``: one short real
    target trial."""
    return _train_target


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 protocol endpoint on 127.0.0.1 (moto's server), for one test module.

    The environment points every S3 client at it (``AWS_ENDPOINT_URL``, dummy
    credentials): pyarrow, hence raysoup and Ray Tune, in this process and in the Ray
    workers a local ``ray.init`` starts afterwards (they inherit the environment).
    Create buckets with the ``s3_bucket`` fixture.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_REGION", "us-east-1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield endpoint
        finally:
            server.stop()


def shared_sweep_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One raysoup cache for every sweep of the session: the first sweep trains the base
    network in a one-thread trial and caches it, the others copy it (a sweep's base run
    adopts a cached base trained the same way: the same bits)."""
    cache = tmp_path_factory.getbasetemp() / "sweep-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def sweep_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shared_sweep_cache`` as a fixture."""
    return shared_sweep_cache(tmp_path_factory)


def local_ray_with_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local 2-CPU Ray using the session's sweep cache, for a module fixture to ``yield
    from`` (started after any environment, e.g. an S3 endpoint's, that its workers must
    inherit)."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAYSOUP_CACHE", str(shared_sweep_cache(tmp_path_factory)))
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
        )
        try:
            yield
        finally:
            ray.shutdown()


def make_bucket(name: str) -> str:
    """Create bucket ``name`` on the current endpoint; returns ``s3://name``."""
    import pyarrow.fs as pafs

    # FileSystem.from_uri honours AWS_ENDPOINT_URL (the S3FileSystem constructor does not).
    fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
    fs.create_dir(name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the moto endpoint, as ``s3://<bucket>``."""
    return make_bucket(f"raysoup-{uuid.uuid4().hex[:16]}")


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
