"""The sweep on a real local Ray instance (reduced sizes)."""

from __future__ import annotations

import pandas as pd
import pytest
import ray

from raysoup.cli import main
from raysoup.io.checkpoint import is_checkpoint
from raysoup.options import OptionsError
from raysoup.results import load_results
from raysoup.sweep.config import load_config
from raysoup.sweep.runner import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


def test_quickstart_end_to_end_then_resume_is_a_no_op(local_ray, tmp_path) -> None:
    config = load_config(
        None, steps=40, aux_steps=20, lp_stage_steps=20, n_hparams=2, checkpoint_freq=20
    )
    root = run_sweep(config, tmp_path)
    trials = load_results(root)["trials"]
    target = trials[trials.stage == "target"]
    assert len(target) == 2 * 3 and target.trial_id.is_unique
    assert set(target.init) == {"pretrained", "ratatouille", "fusing"}
    assert set(trials.stage) == {"base", "lp", "aux", "target"}
    assert target.id_val_acc.between(0, 1).all()
    # the folder reads with plain pandas too
    assert len(pd.read_parquet(root / "results" / "trials")) == len(trials)
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "checkpoints").rglob("model.safetensors")}
    run_sweep(config, tmp_path)  # resume of a finished sweep: nothing retrained, nothing added
    again = load_results(root)["trials"]
    assert len(again) == len(trials)
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}
    # the soup actor souped every group while the sweep ran
    results = load_results(root)
    soups, steps = results["soups"], results["soup_steps"]
    inits = ("pretrained", "ratatouille", "fusing")
    assert sorted(zip(soups.method, soups.init, strict=True)) == sorted(
        (m, i) for m in ("erm", "uniform", "greedy") for i in inits
    )
    assert (soups[soups.method == "uniform"].n_ingredients == 2).all()
    assert soups.test_acc.between(0, 1).all() and soups.id_val_acc.between(0, 1).all()
    for row in soups.itertuples():
        assert is_checkpoint(row.checkpoint), row.checkpoint
    erm = soups[soups.method == "erm"].set_index("init")
    best = target.sort_values("id_val_acc", ascending=False).groupby("init").head(1)
    assert erm.loc[best.init, "id_val_acc"].tolist() == best.id_val_acc.tolist()
    assert len(steps) == len(target) and not steps.duplicated(["trial_id"]).any()
    assert len(pd.read_parquet(root / "results" / "soups")) == len(soups)
    # post-hoc: the same soups again from the checkpoints, then with ">" acceptance
    before = soups.sort_values(["method", "init"]).reset_index(drop=True)
    assert main(["soup", str(root)]) == 0
    after = load_results(root)["soups"].sort_values(["method", "init"]).reset_index(drop=True)
    columns = ["method", "init", "n_ingredients", "id_val_acc", "test_acc"]
    pd.testing.assert_frame_equal(before[columns], after[columns])
    assert main(["soup", str(root), "--method", "greedy", "--accept", "gt"]) == 0
    gt = load_results(root)["soups"]
    assert len(gt) == len(soups) and set(gt[gt.method == "greedy"].accept) == {"gt"}
    assert main(["soup", str(tmp_path / "nowhere")]) == 2
    assert main(["results", str(root), "--format", "markdown", "--plot", str(tmp_path)]) == 0
    assert (tmp_path / "methods.png").stat().st_size > 0
    assert (tmp_path / "soup_progress.png").stat().st_size > 0
    with pytest.raises(OptionsError, match="different config"):
        run_sweep(load_config(None, steps=41, aux_steps=20, lp_stage_steps=20), tmp_path)
