"""The ``raysoup`` command's exit codes, one test per row of the README's table: a code
says what went wrong (``raysoup.errors``), an expected condition gets one line on stderr
and no traceback. Rows also covered elsewhere: 3 with a real failing sweep
(``test_failed_trials``), 4 and 2 across real drivers (``test_fault_matrix``), 5 for an
unwritable or unreachable storage (``test_storage_errors``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from raysoup.cli import main
from raysoup.data.builtin import BUILTIN_TARGET
from raysoup.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_HELD,
    EXIT_RUNS_FAILED,
    EXIT_SWEEP,
    BadInputError,
    EnvironmentProblemError,
    HeldError,
    RunsFailedError,
    SweepError,
)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_table_codes_are_distinct_and_classes_carry_them() -> None:
    codes = [EXIT_SWEEP, EXIT_BAD_INPUT, EXIT_RUNS_FAILED, EXIT_HELD, EXIT_ENVIRONMENT]
    assert sorted(codes) == [1, 2, 3, 4, 5]
    classes = [SweepError, BadInputError, RunsFailedError, HeldError, EnvironmentProblemError]
    assert [cls.exit_code for cls in classes] == codes


def test_bad_config_is_2(tmp_path: Path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("name: bad\nn_hparams: 2\nlearning_rate_typo: 0.1\n")
    code, err = _cli(["run", str(config), "--storage", str(tmp_path / "runs")], capsys)
    assert code == EXIT_BAD_INPUT
    assert "learning_rate_typo" in err and err.count("\n") == 1  # one line
    assert not (tmp_path / "runs" / "bad").exists()  # refused before any work


def test_bad_argument_is_2(tmp_path: Path, capsys) -> None:
    code, err = _cli(["train", "--dataset", "Nope", "--out", str(tmp_path / "r")], capsys)
    assert code == EXIT_BAD_INPUT and "unknown dataset 'Nope'" in err
    argv = ["train", "--dataset", BUILTIN_TARGET, "--test-env", "99", "--out", str(tmp_path)]
    code, err = _cli(argv, capsys)
    assert code == EXIT_BAD_INPUT and "99" in err


def test_refused_checkpoint_is_2(tmp_path: Path, capsys) -> None:
    not_one = tmp_path / "not-a-checkpoint"
    not_one.mkdir()
    (not_one / "model.safetensors").write_bytes(b"junk")
    argv = ["train", "--dataset", BUILTIN_TARGET, "--lp-head", str(not_one)]
    argv += ["--out", str(tmp_path / "r")]
    code, err = _cli(argv, capsys)
    assert code == EXIT_BAD_INPUT and str(not_one) in err and "not a checkpoint" in err


def test_missing_sweep_folder_is_2(tmp_path: Path, capsys) -> None:
    code, err = _cli(["soup", str(tmp_path / "nowhere")], capsys)
    assert code == EXIT_BAD_INPUT and "nowhere" in err


def test_a_failed_run_is_3(tmp_path: Path, capsys) -> None:
    argv = ["train", "--dataset", BUILTIN_TARGET, "--arch", "glyphcnn", "--test-env", "5"]
    argv += ["--steps", "3", "--checkpoint-freq", "3", "--device", "cpu"]
    argv += ["--hparams", '{"lr": 1e10, "lp_steps": 0}', "--out", str(tmp_path / "run")]
    code, err = _cli(argv, capsys)
    assert code == EXIT_RUNS_FAILED and "loss is nan" in err
    assert not (tmp_path / "run").exists()


HOLD = """
import sys, time
from raysoup.sweep.lease import SweepLease
lease = SweepLease(sys.argv[1])
lease.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_sweep_held_by_another_driver_is_4(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs" / "held"
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(HOLD))
    holder = subprocess.Popen(
        [sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, err = _cli(["run", "--storage", str(tmp_path / "runs"), "--name", "held"], capsys)
        assert code == EXIT_HELD and "refused" in err and str(holder.pid) in err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_and_absent_is_5(tmp_path: Path, capsys) -> None:
    argv = ["train", "--dataset", BUILTIN_TARGET, "--device", "cuda", "--out", str(tmp_path)]
    code, err = _cli(argv, capsys)
    assert code == EXIT_ENVIRONMENT and "environment" in err and "CUDA is not available" in err


def test_weights_missing_offline_is_5(
    tmp_path: Path, capsys, monkeypatch, tiny_domainbed: tuple[Path, Path]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache, no network
    data_dir, _ = tiny_domainbed
    argv = ["train", "--dataset", "PACS", "--data-dir", str(data_dir), "--arch", "resnet18"]
    argv += ["--steps", "1", "--device", "cpu", "--out", str(tmp_path / "r")]
    code, err = _cli(argv, capsys)
    assert code == EXIT_ENVIRONMENT and "not available offline" in err


# Row 1 (a stage that did not finish: Ctrl-C of the driver) is checked on a real
# interrupted sweep: test_fault_matrix's SIGINT case asserts the driver exits with 1.
