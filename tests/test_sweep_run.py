"""The sweep on a real local Ray instance (reduced sizes)."""

from __future__ import annotations

import pandas as pd
import pytest
import ray

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
    with pytest.raises(OptionsError, match="different config"):
        run_sweep(load_config(None, steps=41, aux_steps=20, lp_stage_steps=20), tmp_path)
