"""experiments/domainbed_aux_pool.py and experiments/domainbed_sweep.py: argument checks.

Both scripts run end to end (pool, then a target sweep borrowing it, submitted with
``ray job submit``) on a real two-node cluster in tests/test_real_cluster.py.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import ray

from raysoup.sweep.cluster import resolve_address

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "experiments" / "domainbed_sweep.py"
POOL = REPO / "experiments" / "domainbed_aux_pool.py"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (SWEEP, ["--dataset", "PACS", "--test-env", "7"], r"test_envs: 7 is out of range for PACS"),
        (SWEEP, ["--dataset", "PACS", "--test-env", "X"], r"--test-env 'X': PACS envs are"),
        (SWEEP, ["--dataset", "PACS", "--aux-datasets", "PACS"], r"target dataset 'PACS'"),
        (SWEEP, ["--dataset", "PACS", "--hparams", '{"lr": "big"}'], r"lr='big': expected a"),
        (SWEEP, ["--dataset", "PACS", "--hparams", '{"batch": 2}'], r"unknown .*\['batch'\]"),
        (SWEEP, ["--dataset", "PACS", "--n-hparams", "0"], r"n_hparams=0"),
        (SWEEP, ["--dataset", "OfficeHome", "--init", "pretrained"], r"office_home does not"),
        (SWEEP, ["--dataset", "PACS", "--aux-pool", "nowhere"], r"aux_pool='nowhere'"),
        (SWEEP, ["--dataset", "Nope"], r"invalid choice: 'Nope'"),
        (POOL, ["--datasets", "PACS", "--n-hparams", "-1"], r"aux_n_hparams=-1"),
        (POOL, ["--datasets", "PACS", "--steps", "0"], r"aux_steps=0"),
        (POOL, ["--datasets", "PACS", "--lp-stage-steps", "0"], r"lp_stage_steps=0"),
        (POOL, ["--datasets", "PACS", "--lp-steps", "0"], r"(?s)--lp-steps is deprecated.*=0"),
        (SWEEP, ["--dataset", "PACS", "--target-keep", "first"], r"invalid choice: 'first'"),
        (POOL, ["--datasets", "DomainNet"], r"domain_net does not exist"),
    ],
)
def test_bad_arguments_exit_2_before_ray_starts(
    tiny_domainbed, capsys, script: Path, args: list[str], message: str
) -> None:
    data_dir, _ = tiny_domainbed
    was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as exit_info:
        _load(script).main([*args, "--data-dir", str(data_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert ray.is_initialized() == was_up  # no Ray started (nor stopped)


@pytest.mark.parametrize(
    ("flag", "environ", "expected"),
    [
        ("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}, "auto"),
        (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, "10.0.0.1:6379"),
        (None, {}, "local"),
        (None, {"RAY_ADDRESS": ""}, "local"),
    ],
)
def test_scripts_attach_to_the_cluster_they_are_given(flag, environ, expected) -> None:
    assert resolve_address(flag, environ) == expected
