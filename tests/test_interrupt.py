"""Stop the driver mid-sweep (SIGINT, SIGKILL), resume with the same command: every
trial present exactly once, and the same results as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

CONFIG = """\
name: interrupt
n_hparams: 2
steps: 40
aux_steps: 20
lp_stage_steps: 20
checkpoint_freq: 20
aux_n_hparams: 1
aux_lp: false
"""


def _command(config: Path, storage: Path) -> list[str]:
    return [sys.executable, "-m", "raysoup.cli", "run", str(config), "--storage", str(storage)]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "RAYSOUP_CACHE": str(tmp_path / "cache")}


def _run(config: Path, storage: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _command(config, storage), env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _interrupted_run(config: Path, storage: Path, tmp_path: Path, sig: int) -> None:
    """Start the sweep, stop its driver once 2 target trials are done, then resume."""
    targets = storage / "interrupt" / "checkpoints" / "target"
    log = open(tmp_path / f"driver-{sig}.log", "w")
    driver = subprocess.Popen(
        _command(config, storage), env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None:
        if (
            targets.is_dir()
            and len([p for p in targets.iterdir() if not p.name.startswith(".")]) >= 2
        ):
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the sweep finished before it could be interrupted"
    driver.send_signal(sig)
    driver.wait(timeout=120)
    log.close()
    n_done = len([p for p in targets.iterdir() if not p.name.startswith(".")])
    assert 2 <= n_done < 6, f"expected an unfinished target stage, found {n_done} of 6 done"
    second = _run(config, storage, tmp_path)
    assert "stage base: all 1 runs done, skipped" in second.stderr
    assert "stage target:" in second.stderr


def _table(stdout: str) -> str:
    """The printed results table (without the path line that follows it)."""
    return stdout[stdout.index("method") : stdout.index("results: ")]


def _target_rows(storage: Path) -> pd.DataFrame:
    trials = pd.read_parquet(storage / "interrupt" / "results" / "trials")
    assert trials.trial_id.is_unique, trials.trial_id[trials.trial_id.duplicated()].tolist()
    assert trials.groupby("stage").size().to_dict() == {"aux": 3, "base": 1, "lp": 1, "target": 6}
    target = trials[trials.stage == "target"].set_index("trial_id").sort_index()
    return target[["id_val_acc", "test_acc", "content_hash"]]


def _soup_rows(storage: Path) -> pd.DataFrame:
    """The soups: one row per method and init, each exactly once."""
    soups = pd.read_parquet(storage / "interrupt" / "results" / "soups")
    assert not soups.duplicated(["method", "init"]).any()
    assert len(soups) == 5 * 3  # erm, uniform, greedy, uniform_all, ensemble x 3 inits
    steps = pd.read_parquet(storage / "interrupt" / "results" / "soup_steps")
    assert steps.trial_id.is_unique and len(steps) == 6
    soups["ingredients"] = soups.ingredients.map(tuple)
    columns = ["method", "init", "n_ingredients", "ingredients", "id_val_acc", "test_acc"]
    return soups.sort_values(["method", "init"])[columns].reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[pd.DataFrame, str, pd.DataFrame]:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    config = tmp_path / "sweep.yaml"
    config.write_text(CONFIG)
    done = _run(config, tmp_path / "runs", tmp_path)
    return _target_rows(tmp_path / "runs"), _table(done.stdout), _soup_rows(tmp_path / "runs")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_sweep_resumes_to_the_same_results(tmp_path, reference, sig) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(CONFIG)
    _interrupted_run(config, tmp_path / "runs", tmp_path, sig)
    rows = _target_rows(tmp_path / "runs")
    pd.testing.assert_frame_equal(rows, reference[0])
    pd.testing.assert_frame_equal(_soup_rows(tmp_path / "runs"), reference[2])
    final = _run(config, tmp_path / "runs", tmp_path)  # a finished sweep: only the table
    assert _table(final.stdout) == reference[1]
