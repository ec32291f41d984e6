"""Bad places for a sweep get a clear error before Ray starts; a write that fails midway
(a full disk) leaves the previous state readable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raysoup.cli import main
from raysoup.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT
from raysoup.io import storage
from raysoup.io.storage import StorageError


def _run_cli(storage_arg: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["run", "--storage", storage_arg, "--name", "bad-place"])
    return code, capsys.readouterr().err


def test_storage_that_is_a_file(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    code, err = _run_cli(str(blocker), capsys)
    assert code == EXIT_BAD_INPUT
    assert f"{blocker} is a file, not a directory" in err and "Traceback" not in err
    code, err = _run_cli(str(blocker / "deeper"), capsys)  # a file on the way
    assert code == EXIT_BAD_INPUT and f"{blocker} is a file" in err
    assert blocker.read_text() == "not a folder"


def test_storage_that_cannot_be_written(capsys) -> None:
    # /sys refuses new entries even to root, unlike a chmod-ed folder
    code, err = _run_cli("/sys/raysoup-cannot-write-here", capsys)
    assert code == EXIT_ENVIRONMENT
    assert "/sys/raysoup-cannot-write-here" in err and "cannot write there" in err


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import pandas as pd
import torch
from raysoup.io import storage
from raysoup.io.checkpoint import CheckpointMeta, save_checkpoint
from raysoup.results import ResultsStore

root = Path(sys.argv[1])
meta = CheckpointMeta(dataset="d", envs=["a"], arch="cnn", num_classes=2)
# the state before the disk fills up
storage.write_bytes_atomic(root / "sweep.json", b"old config")
save_checkpoint(root / "ckpt", {"w": torch.zeros(4)}, meta)
store = ResultsStore(root / "results")
row = {"sweep": "s", "stage": "base", "trial_id": "k", "dataset": "d", "test_env": -1,
       "trial_seed": 0, "id_val_acc": 0.5, "test_acc": 0.5, "status": "done"}
store.append("trials", [row], part_key="k")

# every file may now hold at most 64 KiB: larger writes fail midway with EFBIG
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
failures = []
many = [{**row, "trial_id": f"{i:08d}-" + "%032x" % (i * 2654435761 ** 3)} for i in range(20000)]
for name, write in [
    ("small file", lambda: storage.write_bytes_atomic(root / "sweep.json", b"x" * (1 << 20))),
    ("checkpoint", lambda: save_checkpoint(root / "ckpt", {"w": torch.ones(1 << 18)}, meta)),
    ("results part", lambda: store.append("trials", many, part_key="k")),
]:
    try:
        write()
    except (OSError, ValueError) as error:
        failures.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failures))
"""


def test_a_write_that_fails_midway_leaves_the_previous_state(tmp_path: Path) -> None:
    script = tmp_path / "full_disk.py"
    script.write_text(textwrap.dedent(FULL_DISK))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "sweep")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    failures = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in failures] == ["small file", "checkpoint", "results part"]
    sweep = tmp_path / "sweep"
    assert (sweep / "sweep.json").read_bytes() == b"old config"
    from raysoup.io.checkpoint import load_checkpoint
    from raysoup.results import ResultsStore

    state, _ = load_checkpoint(sweep / "ckpt")  # hash-checked: the old, complete checkpoint
    assert state["w"].numel() == 4
    assert list(
        ResultsStore(sweep / "results").read_table("trials").column("trial_id").to_pylist()
    ) == ["k"]
    leftovers = [p.name for p in sweep.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []  # no half-written temporary file is left behind


@pytest.mark.usefixtures("s3_endpoint")
def test_missing_bucket_is_reported_before_ray_starts(capsys) -> None:
    import ray

    with pytest.raises(StorageError, match="the bucket does not exist"):
        storage.check_writable("s3://raysoup-no-such-bucket/runs")
    code, err = _run_cli("s3://raysoup-no-such-bucket/runs", capsys)
    assert code == EXIT_ENVIRONMENT and "s3://raysoup-no-such-bucket/runs" in err
    assert not ray.is_initialized()


@pytest.mark.usefixtures("s3_endpoint")
def test_unreachable_endpoint_is_reported(s3_bucket: str) -> None:
    closed = f"{s3_bucket}/runs?endpoint_override=127.0.0.1:1&scheme=http"
    with pytest.raises(StorageError, match="cannot reach the endpoint"):
        storage.check_writable(closed)


@pytest.mark.usefixtures("s3_endpoint")
def test_rejected_credentials_are_reported(s3_bucket: str, monkeypatch) -> None:
    from moto import settings

    # moto checks signatures against its IAM users from now on: "testing" is none of them
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(StorageError, match="check the credentials"):
        storage.check_writable(f"{s3_bucket}/runs")
