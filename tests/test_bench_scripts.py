"""The benchmark scripts under experiments/bench run, print their table and write Parquet
rows (tiny arguments; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

BENCH = Path(__file__).parents[1] / "experiments" / "bench"
SCRIPTS = (
    "merge_throughput",
    "time_to_soup",
    "soup_memory",
    "orchestration",
    "method_table",
    "trainer_throughput",
    "sweep_overhead",
    "soup_regimes",
    "diagnose_memory",
)


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their sibling benchlib
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _random_base(path: Path) -> Path:
    """A built-in base checkpoint with random weights: trials need one, not a trained one."""
    import torch

    from raysoup.data.registry import dataset_class
    from raysoup.io.checkpoint import CheckpointMeta, save_checkpoint
    from raysoup.models.networks import build_network

    cls = dataset_class("BaseDigits")
    torch.manual_seed(0)
    network = build_network("cnn", cls.NUM_CLASSES, input_channels=cls.INPUT_SHAPE[0])
    meta = CheckpointMeta("BaseDigits", list(cls.ENVIRONMENTS), "cnn", cls.NUM_CLASSES, "base")
    save_checkpoint(path, network.state_dict(), meta)
    return path


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _load(name).main(["--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_merge_throughput_writes_one_row_per_contender(tmp_path, capsys) -> None:
    out = tmp_path / "merge.parquet"
    bench = _load("merge_throughput")
    assert bench.main(["--model", "cnn", "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 0
    rows = pd.read_parquet(out)
    assert {"raysoup", "reference", "floor"} == set(rows["kind"])
    assert (rows.loc[rows["method"] == bench.FLOOR, "x_floor"] == 1.0).all()
    assert (rows["median_ms"] > 0).all() and (rows["repeats"] == 2).all()
    assert "model soups greedy step" in capsys.readouterr().out


def test_reference_idioms_average_like_running_soup() -> None:
    import torch

    from raysoup.soup.average import RunningSoup

    bench = _load("merge_throughput")
    states = [{"w": torch.randn(4, 3), "b": torch.randn(3)} for _ in range(3)]
    running = RunningSoup()
    for state in states:
        running.add(state)
    diwa = dict(states[0])
    greedy = dict(states[0])
    uniform = {k: torch.zeros_like(v) for k, v in states[0].items()}
    for n, state in enumerate(states[1:], start=1):
        bench.diwa_add_weights(diwa, state, n)
        greedy = bench.soups_greedy_step(greedy, state, n)
    for state in states:
        uniform = bench.soups_uniform_step(uniform, state, 3)
    for soup in (diwa, greedy, uniform):
        for key, value in running.average().items():
            torch.testing.assert_close(soup[key], value)


def test_time_to_soup_streaming_and_posthoc_agree(tmp_path) -> None:
    base = _random_base(tmp_path / "base")
    out = tmp_path / "tts.parquet"
    args = ["--k", "3", "--steps", "1", "--lp-steps", "2", "--repeats", "1", "--out", str(out)]
    args += ["--modes", "streaming-maker", "posthoc-resoup", "posthoc-sorted"]
    args += ["--base", str(base), "--workdir", str(tmp_path / "work")]
    assert _load("time_to_soup").main(args) == 0
    rows = pd.read_parquet(out)
    assert list(rows["mode"]) == ["streaming-maker", "posthoc-resoup", "posthoc-sorted"]
    assert rows["same_soup"].all()  # streaming ends with exactly the batch Recipe-1 soup
    sorted_row = rows.set_index("mode").loc["posthoc-sorted"]
    assert sorted_row["evals_after"] == 2  # batch Recipe 1: k - 1 evaluations
    assert (rows["delay_s"] >= rows["decide_s"]).all()


def test_soup_memory_modes_agree_and_main_writes_rows(tmp_path) -> None:
    bench = _load("soup_memory")
    candidates = bench.ranked_order(bench.make_candidates(tmp_path / "c", 3, arch="cnn"))
    sizes = {
        mode: bench.run_mode(mode, candidates, tmp_path / mode, 2)["greedy_size"]
        for mode in bench.MODES
    }
    assert len(set(sizes.values())) == 1, sizes  # same Recipe-1 soup every way
    out = tmp_path / "memory.parquet"
    args = ["--n", "2", "--arch", "cnn", "--modes", "posthoc-all", "--workdir", str(tmp_path)]
    assert bench.main([*args, "--out", str(out)]) == 0
    row = pd.read_parquet(out).iloc[0]
    assert row["mode"] == "posthoc-all" and row["n"] == 2 and row["peak_mb"] > 0


def test_diagnose_memory_counts_every_part_and_main_writes_rows(tmp_path) -> None:
    bench = _load("diagnose_memory")
    candidates = bench.make_candidates(tmp_path / "c", 3, arch="cnn")
    soup = bench.make_soup(candidates, tmp_path / "soup")
    options = {"device": "cpu", "points": 3, "pair_trials": 2, "landscape": True, "grid": 2}
    row = bench.diagnose_peak(candidates, soup, options, "cnn")
    # init->trial 3x3, one pair 3, soup->ingredient 3x3, one angle, a 2x2 plane + 3 marks
    assert row["rows"] == 9 + 3 + 9 + 1 + 4 + 3 and row["peak_mb"] > 0
    out = tmp_path / "diagnose.parquet"
    args = ["--n", "2", "--arch", "cnn", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    assert bench.main(args) == 0
    assert pd.read_parquet(out).iloc[0]["n"] == 2


def test_orchestration_overhead_row() -> None:
    import torch

    bench = _load("orchestration")
    row = bench.overhead_row("with", 10, 2, {"wall_s": 10.0}, 1.0, 12.0)
    assert row["ideal_s"] == 5.0 and row["overhead_x"] == 2.0
    assert row["overhead_per_trial_s"] == 1.0 and row["overhead_in_trials_x"] == 10.0 / 6.0
    assert row["overhead_with_soup_work_x"] == 2.0  # no soup work measured
    measured = {"wall_s": 10.0, "soup_cpu_s": 9.0, "soup_work_s": 2.0}
    row = bench.overhead_row("with", 10, 2, measured, 1.0, 12.0)
    assert row["ideal_with_soup_s"] == 6.0  # the soups' work alone shares the 2 slots
    assert row["overhead_with_soup_work_x"] == 10.0 / 6.0
    config = bench.sweep_config("orch", 7, 2, torch.device("cpu"))
    assert config.n_hparams == 7 and config.inits == ["pretrained"]


def test_trainer_throughput_rows(tmp_path) -> None:
    base = _random_base(tmp_path / "base")
    out = tmp_path / "throughput.parquet"
    bench = _load("trainer_throughput")
    args = ["--steps", "3", "--repeats", "1", "--base", str(base), "--out", str(out)]
    assert bench.main(args) == 0
    rows = pd.read_parquet(out).set_index("mode")
    assert list(rows.index) == list(bench.MODES)
    assert rows.loc[bench.MODES[0], "x_bare"] == 1.0
    assert rows.loc[bench.MODES[0], ["eval_share", "data_share"]].tolist() == [0.0, 0.0]
    trainer = rows.loc[list(bench.MODES[1:])]
    assert ((trainer.eval_share > 0) & (trainer.eval_share < 1)).all()
    assert ((trainer.data_share > 0) & (trainer.data_share < 1)).all()
    # 3 steps of 32 images from each of the 5 training envs (default hparams)
    assert (rows.images == 3 * 32 * 5).all() and (rows.images_per_s > 0).all()


def test_method_table_reads_an_existing_run(tmp_path) -> None:
    from raysoup.results import ResultsStore
    from raysoup.sweep.config import SweepConfig
    from raysoup.sweep.record import record_config

    root = tmp_path / "run"
    config = SweepConfig(name="run", trial_seeds=[0, 1], inits=["pretrained"]).validate()
    record_config(root, config)
    rows = [
        {
            "sweep": "run",
            "method": method,
            "dataset": "MiniRotatedMNIST",
            "test_env": 5,
            "trial_seed": seed,
            "init": "pretrained",
            "n_ingredients": 1 if method == "erm" else 3,
            "ingredients": ["a"],
            "id_val_acc": 0.9,
            "test_acc": acc,
            "checkpoint": "x",
        }
        for method, seed, acc in [("erm", 0, 0.7), ("erm", 1, 0.8), ("greedy", 0, 0.75)]
    ]
    ResultsStore(root / "results").append("soups", rows, part_key="all")
    out = tmp_path / "table.parquet"
    assert _load("method_table").main(["--results", str(root), "--out", str(out)]) == 0
    table = pd.read_parquet(out).set_index(["method", "test_env"])
    assert table.loc[("erm", "5"), "test_acc_mean"] == pytest.approx(75.0)
    assert table.loc[("erm", "5"), "test_acc_se"] == pytest.approx(5.0 / 2**0.5)
    assert table.loc[("erm", "Avg"), "n_seeds"] == 2
    assert table.loc[("greedy", "5"), "n_seeds"] == 1


@pytest.mark.slow
def test_sweep_overhead_times_a_real_sweep_and_its_runs_alone(
    tmp_path, sweep_cache, monkeypatch, capsys
) -> None:
    """A tiny sweep (an LP and a target run from the shipped foundation: no base run to
    train): one row, every run timed alone."""
    monkeypatch.setenv("RAYSOUP_CACHE", str(sweep_cache))
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\ndataset: NuisanceMNIST\ntest_envs: [2]\nn_hparams: 1\n"
        "inits: [pretrained]\naux_datasets: []\nsteps: 10\ncheckpoint_freq: 10\n"
        "lp_stage_steps: 10\n"
    )
    out = tmp_path / "rows.parquet"
    bench = _load("sweep_overhead")
    assert bench.main([str(config), "--slots", "2", "--out", str(out)]) == 0
    assert "wall_over_plan_order_x" in capsys.readouterr().out
    (row,) = pd.read_parquet(out).to_dict("records")
    assert row["runs"] == 2 and row["sweep"] == "tiny"
    assert 0 < row["lower_bound_s"] <= row["plan_order_s"] <= row["work_s"]
    assert row["wall_s"] > 0


def test_soup_regimes_runs_both_studies_on_tiny_runs(tmp_path, capsys) -> None:
    module = _load("soup_regimes")
    work, steps_out, regimes_out = tmp_path / "w", tmp_path / "s.parquet", tmp_path / "r.parquet"
    tiny = ["--workdir", str(work), "--lp-steps", "2", "--workers", "1"]
    steps = ["--lrs", "1e-3", "3e-3", "--runs", "2", "--steps", "4"]
    assert module.main(["steps", *tiny, *steps, "--out", str(steps_out)]) == 0
    curve = pd.read_parquet(steps_out)
    assert sorted(set(curve.lr)) == [1e-3, 3e-3] and sorted(set(curve.step)) == [1, 4]
    assert "plateau" in capsys.readouterr().out
    regimes = ["--factors", "default", "--n", "3", "--seeds", "0", "1", "--target-steps", "4"]
    args = ["regimes", *tiny, *regimes, "--out", str(regimes_out), "--plot", str(tmp_path)]
    assert module.main(args) == 0
    rows = pd.read_parquet(regimes_out)
    assert list(rows.trial_seed) == [0, 1] and set(rows.factor) == {"default"}
    assert (rows.greedy_n >= 1).all() and (rows.greedy_n <= 3).all()
    # ERM is the best run by ID-val; greedy starts from it and never scores below on ID-val
    assert (rows.greedy_id_val_acc >= rows.erm_id_val_acc).all()
    assert (tmp_path / "soup_regimes.png").stat().st_size > 0
    assert "uniform - erm" in capsys.readouterr().out
    # by-lr: a sweep's groups split by lr, here the steps study's 4 runs as one sweep's
    from raysoup.io.checkpoint import read_meta
    from raysoup.results.store import ResultsStore

    runs = sorted(work.glob("runs/*-lr*/s0/h*[0-9]"))
    assert len(runs) == 4
    rows = []
    for run in runs:
        meta = read_meta(run)
        rows.append(
            {
                "sweep": "s", "stage": "target", "trial_id": run.parent.parent.name + run.name,
                "dataset": meta.dataset, "test_env": meta.test_env, "trial_seed": 0,
                "init": "pretrained", "lr": meta.hparams["lr"], "status": "done",
                "id_val_acc": meta.metrics["id_val_acc"], "test_acc": meta.metrics["test_acc"],
                "checkpoint": str(run),
            }
        )  # fmt: skip
    ResultsStore(tmp_path / "sweep" / "results").append("trials", rows, part_key="all")
    by_lr_out = tmp_path / "b.parquet"
    assert module.main(["by-lr", "--sweep", str(tmp_path / "sweep"), "--out", str(by_lr_out)]) == 0
    split = pd.read_parquet(by_lr_out).set_index("label")
    assert sorted(split.index) == ["0.001", "0.003", "all"]
    assert list(split.n_runs.loc[["all", "0.001", "0.003"]]) == [4, 2, 2]
    # the best run of all is the best of its lr's
    assert split.erm_id_val_acc["all"] == split.erm_id_val_acc[["0.001", "0.003"]].max()
