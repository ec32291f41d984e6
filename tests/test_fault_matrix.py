"""The fault matrix (README, "What a crash leaves"): stop the driver mid-sweep (SIGINT,
SIGKILL), kill a trial's worker, damage checkpoints, Parquet parts, the sweep record and
the soup state; the same command resumes or repairs to exactly the results of an
uninterrupted run (every trial present once), or stops with an error that says what to do.
A second driver on a held sweep is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from raysoup.errors import EXIT_BAD_INPUT, EXIT_HELD, EXIT_SWEEP
from raysoup.io.layout import SweepLayout
from raysoup.io.storage import find_checkpoints
from raysoup.results import load_results
from raysoup.results.schema import SWEEP_KINDS

pytestmark = pytest.mark.slow

CONFIG = """\
name: interrupt
n_hparams: 2
steps: 40
aux_steps: 20
lp_stage_steps: 20
checkpoint_freq: 40
eval_schedule: multiples
aux_n_hparams: 1
aux_lp: false
"""


def _command(config: Path, storage: Path | str) -> list[str]:
    return [sys.executable, "-m", "raysoup.cli", "run", str(config), "--storage", str(storage)]


@pytest.fixture(scope="module", autouse=True)
def _one_cache(sweep_cache: Path) -> Iterator[None]:
    """Every driver of this module uses the session's sweep cache (one base network)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAYSOUP_CACHE", str(sweep_cache))
        yield


def _run(config: Path, storage: Path | str) -> subprocess.CompletedProcess:
    """The command to completion (its environment: this process's, with the cache)."""
    done = subprocess.run(_command(config, storage), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _second_driver_is_refused(config: Path, storage: Path, holder: int) -> None:
    """The same command while a driver holds the sweep: refused before anything starts,
    naming the holder (issue figure: how fast, printed, not asserted)."""
    start = time.perf_counter()
    refused = subprocess.run(_command(config, storage), capture_output=True, text=True, timeout=120)
    print(f"second driver refused in {time.perf_counter() - start:.1f} s")
    assert refused.returncode == EXIT_HELD, refused.stderr[-3000:]
    assert f"pid {holder} on " in refused.stderr and "Traceback" not in refused.stderr
    assert "stage base" not in refused.stderr  # refused before any stage


def _interrupt(config: Path, storage: Path, log_path: Path, sig: int, more: int) -> str:
    """Start the sweep's command, send ``sig`` to its driver once it has printed its plan
    and ``more`` target trials are done than when it started (the trial in flight is
    lost), and return what the driver printed."""
    targets = storage / "interrupt" / "checkpoints" / "target"

    def n_done() -> int:
        if not targets.is_dir():
            return 0
        return len([p for p in targets.iterdir() if not p.name.startswith(".")])

    after = n_done() + more  # an earlier interruption may have left trials finishing

    with open(log_path, "w") as log:
        driver = subprocess.Popen(_command(config, storage), stdout=log, stderr=subprocess.STDOUT)
    lease = storage / "interrupt" / "lease.json"
    deadline = time.time() + 1500  # generous: a loaded machine is slow
    while time.time() < deadline and driver.poll() is None and not lease.exists():
        time.sleep(0.2)
    _second_driver_is_refused(config, storage, driver.pid)
    while time.time() < deadline and driver.poll() is None:
        if n_done() >= after and "raysoup: stage target: " in log_path.read_text():
            break
        time.sleep(0.1)
    assert driver.poll() is None, "the sweep finished before it could be interrupted"
    assert targets.is_dir(), "no target trial finished in time"
    driver.send_signal(sig)
    driver.wait(timeout=120)
    assert after <= n_done() < 6, f"expected an unfinished target stage, found {n_done()} of 6"
    assert lease.exists() == (sig == signal.SIGKILL)  # SIGINT releases it on the way out
    if sig == signal.SIGINT:  # the exit-code table's row 1: a stage that did not finish
        assert driver.returncode == EXIT_SWEEP, log_path.read_text()[-3000:]
        assert "Run the same command again to resume" in log_path.read_text()
    return log_path.read_text()


def _table(stdout: str) -> str:
    """The printed results table (without the path line that follows it)."""
    return stdout[stdout.index("method") : stdout.index("results: ")]


def _root(storage: Path | str) -> Path | str:
    return storage / "interrupt" if isinstance(storage, Path) else f"{storage}/interrupt"


def _target_rows(storage: Path | str) -> pd.DataFrame:
    trials = load_results(_root(storage))["trials"]
    assert trials.trial_id.is_unique, trials.trial_id[trials.trial_id.duplicated()].tolist()
    assert trials.groupby("stage").size().to_dict() == {"aux": 3, "base": 1, "lp": 1, "target": 6}
    target = trials[trials.stage == "target"].set_index("trial_id").sort_index()
    return target[["id_val_acc", "test_acc", "content_hash"]]


def _soup_rows(storage: Path | str) -> pd.DataFrame:
    """The soups: one row per method and init, each exactly once."""
    results = load_results(_root(storage))
    soups = results["soups"]
    assert not soups.duplicated(["method", "init"]).any()
    assert len(soups) == 5 * 3  # erm, uniform, greedy, uniform_all, ensemble x 3 inits
    steps = results["soup_steps"]
    assert steps.trial_id.is_unique and len(steps) == 6
    soups["ingredients"] = soups.ingredients.map(tuple)
    columns = ["method", "init", "n_ingredients", "ingredients", "id_val_acc", "test_acc"]
    return soups.sort_values(["method", "init"])[columns].reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[pd.DataFrame, str, pd.DataFrame]:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    config = tmp_path / "sweep.yaml"
    config.write_text(CONFIG)
    done = _run(config, tmp_path / "runs")
    runs = tmp_path / "runs"
    return _target_rows(runs), _table(done.stdout), _soup_rows(runs), config, runs


def test_interrupted_twice_resumes_to_the_same_results(tmp_path, reference) -> None:
    """SIGINT of the driver once a target trial is done; the same command resumes, and
    its driver is SIGKILLed once one more is done; the same command again ends with exactly the
    uninterrupted run's trials and soups (each once), then prints the same table.

    One trial, not two, before the SIGINT: the trials in flight may finish while it is
    handled, and at least 3 of the 6 must be left, so that with 2 slots the last one
    starts after another ends and the SIGKILL always finds the stage unfinished (2 left
    can end together, between two polls)."""
    config, runs = tmp_path / "sweep.yaml", tmp_path / "runs"
    config.write_text(CONFIG)
    _interrupt(config, runs, tmp_path / "first.log", signal.SIGINT, more=1)
    resumed = _interrupt(config, runs, tmp_path / "second.log", signal.SIGKILL, more=1)
    assert "took over the lease" not in resumed  # SIGINT released it
    assert "stage base: all 1 runs done, skipped" in resumed
    assert "stage target: " in resumed and " of 6 runs to do" in resumed
    last = _run(config, runs)
    assert "took over the lease" in last.stderr  # the killed driver's lease, at once
    assert not (runs / "interrupt" / "lease.json").exists()
    assert "stage target: " in last.stderr and "stage lp: all 1 runs done" in last.stderr
    pd.testing.assert_frame_equal(_target_rows(runs), reference[0])
    pd.testing.assert_frame_equal(_soup_rows(runs), reference[2])
    final = _run(config, runs)  # a finished sweep: only the table
    assert _table(final.stdout) == reference[1]


# ---------------------------------------------------------------- the fault matrix
# Each case damages the finished reference sweep (or a live sweep), then checks that it
# ends with nothing lost and nothing duplicated (the same rows as the reference), or with
# a clear error that names what to do. The cases on the reference folder repair it.


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysoup.cli", *args],
        capture_output=True,
        text=True,
        timeout=1500,
    )


def _same_as_reference(storage: Path | str, reference) -> None:
    pd.testing.assert_frame_equal(_target_rows(storage), reference[0])
    pd.testing.assert_frame_equal(_soup_rows(storage), reference[2])


def test_fault_truncated_trial_checkpoint_after_souping(reference) -> None:
    *_, config, runs = reference
    checkpoint = sorted((runs / "interrupt" / "checkpoints" / "target").iterdir())[0]
    weights = checkpoint / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])

    resoup = _cli("soup", str(runs / "interrupt"))
    assert resoup.returncode == EXIT_BAD_INPUT, resoup.stderr[-3000:]
    assert str(weights) in resoup.stderr and "run the sweep's command again" in resoup.stderr

    again = _run(config, runs)  # the damaged run is retrained, the rest kept
    assert "stage target: 1 of 6 runs to do" in again.stderr
    assert weights.read_bytes() == original  # bit-identical on CPU
    _same_as_reference(runs, reference)


def test_fault_damaged_results_parts(reference) -> None:
    *_, config, runs = reference
    results = runs / "interrupt" / "results"
    damaged = [sorted((results / kind).glob("part-*.parquet"))[0] for kind in SWEEP_KINDS]
    for part in damaged:
        part.write_bytes(part.read_bytes()[:100])

    read = _cli("results", str(runs / "interrupt"))
    assert read.returncode == EXIT_BAD_INPUT, read.stderr[-3000:]
    assert "is damaged" in read.stderr and "run the sweep's command again" in read.stderr

    again = _run(config, runs)
    assert again.stderr.count("set aside damaged") == len(SWEEP_KINDS)
    assert all(part.exists() for part in damaged)  # rewritten under the same names
    _same_as_reference(runs, reference)


def test_fault_corrupt_sweep_record(reference) -> None:
    table, *_, config, runs = reference[1:]
    record = runs / "interrupt" / "sweep.json"
    good = record.read_bytes()
    record.write_bytes(good[: len(good) // 2])

    refused = _cli("run", str(config), "--storage", str(runs))
    assert refused.returncode == EXIT_BAD_INPUT, refused.stderr[-3000:]
    assert f"{record} is corrupt" in refused.stderr and "Delete" in refused.stderr
    assert "stage base" not in refused.stderr
    assert _cli("results", str(runs / "interrupt")).returncode == 0

    record.unlink()  # what the message says to do, with the original config
    again = _run(config, runs)
    assert "stage target: all 6 runs done, skipped" in again.stderr
    assert json.loads(record.read_bytes()) == json.loads(good)
    assert _table(again.stdout) == table
    _same_as_reference(runs, reference)


def test_fault_soup_state_torn_by_a_kill_mid_write(reference) -> None:
    """What SIGKILL of the soup actor inside its atomic state write leaves on disk: the
    previous ``state.json`` and a half-written hidden temporary file beside it. (A kill
    at any other moment is ``test_soup_actor.py``'s killed-actor test.)"""
    *_, config, runs = reference
    state = SweepLayout(runs / "interrupt").soup_state
    good = json.loads(state.read_bytes())
    torn = state.parent / f".state.json.tmp-{uuid.uuid4().hex}"
    torn.write_bytes(state.read_bytes()[:200])
    _run(config, runs)
    assert json.loads(state.read_bytes())["groups"] == good["groups"]
    _same_as_reference(runs, reference)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running_trial_workers(driver: int) -> list[int]:
    """Ray worker processes of this driver's cluster running a Tune trial."""
    workers = []
    for pid in _descendants(driver):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ImplicitFunc.train" in title:
            workers.append(pid)
    return workers


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray workers through /proc")
def test_fault_worker_then_driver_killed_on_s3(reference, s3_bucket, tmp_path) -> None:
    """SIGKILL of a trial's worker mid-trial once target trials run (Tune retries the
    trial), then SIGKILL of the driver mid target stage, on S3; the same command resumes
    to the reference results."""
    *_, config, _ = reference
    storage = f"{s3_bucket}/runs"
    root = f"{storage}/interrupt"
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(_command(config, storage), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 1500
    killed: list[int] = []
    while time.time() < deadline and driver.poll() is None and not killed:
        if find_checkpoints(f"{root}/checkpoints/target"):  # target trials are running
            for worker in _running_trial_workers(driver.pid)[:1]:
                time.sleep(1.0)  # mid-trial, not at its start
                os.kill(worker, signal.SIGKILL)
                killed.append(worker)
        time.sleep(0.2)
    assert killed, "no running target trial worker was found to kill"
    while time.time() < deadline and driver.poll() is None:
        if len(find_checkpoints(f"{root}/checkpoints/target")) >= 2:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the sweep finished before the driver could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=120)
    assert len(find_checkpoints(f"{root}/checkpoints/target")) < 6

    again = _run(config, storage)
    assert "took over the lease" in again.stderr
    _same_as_reference(storage, reference)
