"""When runs may start (no stage barriers): the pure queue, and the Tune searcher on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import minirotated
from ray.tune.search import Searcher

from raysoup.sweep.config import load_config
from raysoup.sweep.plan import dependencies, plan_sweep
from raysoup.sweep.runner import trial_slots
from raysoup.sweep.schedule import PlanSearcher, RunQueue

# A small sweep's shape: LP <- targets; aux1, aux2 <- ratatouille target.
ORDER = ["lp", "aux1", "aux2", "t-pre", "t-rat"]
WAITS = {"t-pre": ["lp"], "t-rat": ["lp", "aux1", "aux2"]}


def _drain(queue: RunQueue) -> list[str]:
    started = []
    while (key := queue.next_ready()) is not None:
        started.append(key)
    return started


def test_runs_start_in_plan_order_as_soon_as_what_they_need_is_done() -> None:
    queue = RunQueue(ORDER, WAITS)
    assert _drain(queue) == ["lp", "aux1", "aux2"]  # the targets wait for the LP head
    queue.finish("lp", ok=True)
    # the pretrained target starts now, while the auxiliary runs still train
    assert _drain(queue) == ["t-pre"]
    queue.finish("aux1", ok=True)
    assert queue.next_ready() is None and not queue.exhausted
    queue.finish("aux2", ok=True)
    assert _drain(queue) == ["t-rat"] and queue.exhausted
    assert queue.running == {"t-pre", "t-rat"}


def test_a_failed_run_drops_its_dependants_naming_the_root_cause() -> None:
    order = ["a", "b", "c", "d", "e"]
    queue = RunQueue(order, {"b": ["a"], "c": ["b"], "d": ["c"], "e": []})
    assert _drain(queue) == ["a", "e"]
    queue.finish("a", ok=False)
    assert queue.failed == {"a"}
    assert queue.blocked == {"b": "a", "c": "a", "d": "a"}
    assert queue.exhausted and queue.next_ready() is None
    queue.finish("e", ok=True)
    assert queue.done == {"e"} and not queue.running


def test_waiting_for_a_run_that_is_not_queued_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not queued.*'x'"):
        RunQueue(["a"], {"a": ["x"]})


def test_searcher_asks_again_later_then_says_finished() -> None:
    configs = {key: {"key": key} for key in ORDER}
    searcher = PlanSearcher(configs, WAITS)
    suggested = [searcher.suggest(f"trial{i}") for i in range(3)]
    assert [s["run"]["key"] for s in suggested] == ["lp", "aux1", "aux2"]
    assert searcher.suggest("trial3") is None  # nothing ready: Tune asks again later
    searcher.on_trial_complete("trial0", {"done": True})
    assert searcher.suggest("trial3") == {"run": {"key": "t-pre"}}
    searcher.on_trial_complete("trial1", error=True)  # aux1 failed after its retries
    assert searcher.queue.blocked == {"t-rat": "aux1"}
    assert searcher.suggest("trial4") is Searcher.FINISHED


def test_searcher_state_is_readable_json(tmp_path: Path) -> None:
    searcher = PlanSearcher({"a": {}, "b": {}}, {"b": ["a"]})
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", error=True)
    searcher.save(str(tmp_path / "state.json"))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state == {"done": [], "failed": ["a"], "blocked": {"b": "a"}, "running": []}


@pytest.mark.parametrize("sweep", ["quickstart", "minirotated"])
def test_the_quickstart_plan_needs_no_barrier(sweep: str, tmp_path: Path) -> None:
    """On the real plans (the quickstart's: no base; MiniRotatedMNIST's: a base run): every
    dependency is an earlier run (plan order is a valid start order), and the pretrained
    targets need only their LP head, not the auxiliary runs."""
    config = load_config(None) if sweep == "quickstart" else minirotated(n_hparams=2)
    plan = plan_sweep(config, tmp_path)
    runs = [run for stage_runs in plan.values() for run in stage_runs]
    position = {run.key: i for i, run in enumerate(runs)}
    waits = {run.key: dependencies(run, plan) for run in runs}
    assert all(position[dep] < position[key] for key, deps in waits.items() for dep in deps)
    queue = RunQueue([run.key for run in runs], waits)
    aux = {run.key for run in plan["aux"]}
    pretrained = {run.key for run in plan["target"] if run.spec["init"] == "pretrained"}
    started: list[str] = []
    while not pretrained <= set(started):  # finish everything but the auxiliary runs
        ready = _drain(queue)
        assert ready, f"stuck after {started}"
        started += ready
        for key in ready:
            if key not in aux and key not in pretrained:
                queue.finish(key, ok=True)
    assert aux <= set(started) and aux.isdisjoint(queue.done)  # all still running
    other = {run.key for run in plan["target"]} - pretrained
    assert other.isdisjoint(started)  # ratatouille and fusing wait for the aux runs


def test_ideal_schedules_respect_dependencies_and_slots() -> None:
    from raysoup.sweep.schedule import critical_path, ideal_lower_bound, plan_order_makespan

    # base (4 s) -> lp (1 s) -> three targets (2 s each); an aux run (3 s) needs the base
    work = {"base": 4.0, "lp": 1.0, "aux": 3.0, "t1": 2.0, "t2": 2.0, "t3": 2.0}
    waits = {"lp": ["base"], "aux": ["base"], "t1": ["lp"], "t2": ["lp"], "t3": ["lp", "aux"]}
    order = ["base", "lp", "aux", "t1", "t2", "t3"]
    assert critical_path(work, waits) == 4 + 3 + 2
    assert ideal_lower_bound(work, waits, slots=2) == 9.0  # the chain, not 14 / 2
    assert ideal_lower_bound(work, waits, slots=1) == 14.0
    # two slots: base 0-4; lp 4-5 | aux 4-7; t1 5-7; t2 7-9 | t3 7-9
    assert plan_order_makespan(order, work, waits, slots=2) == 9.0
    assert plan_order_makespan(order, work, waits, slots=1) == 14.0
    assert plan_order_makespan(order, work, waits, slots=8) == critical_path(work, waits)
    with pytest.raises(ValueError, match="cycle"):
        critical_path({"a": 1.0, "b": 1.0}, {"a": ["b"], "b": ["a"]})
    with pytest.raises(ValueError, match="slots=0"):
        plan_order_makespan(order, work, waits, slots=0)


@pytest.mark.parametrize(
    ("resources", "overrides", "expected"),
    [
        ({"CPU": 2.0}, {}, 2),
        ({"CPU": 16.0, "GPU": 1.0}, {"gpus_per_trial": 0.45}, 2),
        ({"CPU": 16.0}, {"max_concurrent_trials": 3}, 3),
        ({"CPU": 3.0}, {"cpus_per_trial": 2.0}, 1),
        ({"CPU": 1.0}, {"cpus_per_trial": 2.0}, 1),  # never 0: Tune must still stage one
        ({"CPU": 0.9999999999}, {}, 1),
        ({"CPU": 4.0}, {"soup_cpus": 1.0}, 3),  # the soup actor holds its share
        ({"CPU": 16.0, "GPU": 1.0}, {"gpus_per_trial": 0.3, "soup_gpus": 0.4}, 2),
    ],
)
def test_trial_slots_count_what_fits_side_by_side(
    resources: dict[str, float], overrides: dict, expected: int
) -> None:
    assert trial_slots(minirotated(**overrides), resources) == expected
