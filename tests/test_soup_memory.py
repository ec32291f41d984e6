"""The soup maker's peak memory does not grow with the number of trials (measured in
fresh processes with ``ru_maxrss``; see experiments/bench/soup_memory.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from raysoup.io.checkpoint import read_meta

pytestmark = pytest.mark.slow

BENCH = Path(__file__).parents[1] / "experiments" / "bench" / "soup_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("soup_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_memory_is_bounded_whatever_the_number_of_trials(tmp_path) -> None:
    bench = _bench()
    candidates = bench.make_candidates(tmp_path / "trials", 10)
    # Arriving best first, each trial is decided once (no re-decisions): a short test.
    candidates.sort(key=lambda p: -read_meta(p).metrics["id_val_acc"])
    model_mb = (candidates[0] / "model.safetensors").stat().st_size / 2**20
    few = bench.measure(candidates[:4], tmp_path / "few", max_models=2)
    many = bench.measure(candidates, tmp_path / "many", max_models=2)
    assert many["greedy_size"] > 2  # the soup (and its running sum) really grew
    assert many["loads"] > len(candidates)
    # 6 more trials would be 6 more models (~270 MB) if they were all held in memory
    assert many["peak_mb"] - few["peak_mb"] < 3 * model_mb, (few, many, model_mb)
