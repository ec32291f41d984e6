"""Shared fixtures. Every test runs with outbound network blocked (loopback stays open)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The first built-in benchmark at its old quickstart size (the quickstart itself is the
# nuisance benchmark's): the sweep most tests plan and run (a small CNN, a base stage).
MINIROTATED: dict = {
    "dataset": "MiniRotatedMNIST",
    "test_envs": [5],
    "aux_datasets": ["AuxRotationFlip", "AuxRecolourMod5", "AuxNoiseSubpop"],
    "n_hparams": 3,
    "aux_n_hparams": 1,
}


def minirotated(**overrides: object) -> object:
    """``load_config(None, ...)`` of the MiniRotatedMNIST sweep, validated."""
    from raysoup.sweep.config import load_config

    return load_config(None, **{**MINIROTATED, **overrides})


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test files with slow (end-to-end) tests first, each file's tests in their order:
    two xdist workers then share the long files from the start rather than wait for the
    last one to end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every pytest-xdist worker of this session shares (the session's base temp
    folder without xdist): what a session fixture builds once for all workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def built_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """``shared_root / name``, held under a file lock across xdist workers: the first
    worker builds what is missing inside the block, the others find it built."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    with FileLock(str(root / f"{name}.lock")):
        yield root / name


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op thread count set to ``n`` for the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shared_sweep_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One raysoup cache for every sweep of the session (every xdist worker), holding the
    built-in base network trained with one torch thread, as a sweep's one-CPU base trial
    trains it: a sweep's base run adopts it (the same bits) instead of training it."""
    from raysoup.training.trainer import ensure_base_checkpoint

    with built_once(tmp_path_factory, "sweep-cache") as cache, torch_threads(1):
        cache.mkdir(exist_ok=True)
        ensure_base_checkpoint(cache, device="cpu")
    return cache


@pytest.fixture(scope="session")
def sweep_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``shared_sweep_cache`` as a fixture."""
    return shared_sweep_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def base_checkpoint(sweep_cache: Path) -> Path:
    """The built-in base network (one torch thread), trained once for the session."""
    import torch

    from raysoup.training.trainer import base_cache_path

    with torch_threads(1):
        return base_cache_path(torch.device("cpu"), sweep_cache)


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
    from raysoup.io.checkpoint import is_checkpoint
    from raysoup.soup.group import Offer

    offers = []
    with built_once(tmp_path_factory, "soup-trials") as root:
        for h in range(N_SOUP_TRIALS):
            path = root / f"target-h{h}"
            if not is_checkpoint(path):
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
