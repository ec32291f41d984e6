"""The sweep's status lines (``raysoup.sweep.progress``): what they say, and at most one
per ``every_s`` seconds, only after a change. Driven here by the callback hooks Tune
calls, with a fake clock; ``test_sweep_run`` checks the lines of a real sweep."""

from __future__ import annotations

import io
from types import SimpleNamespace

from raysoup.sweep.progress import SweepProgress, status_line


def _trial(key: str) -> SimpleNamespace:
    return SimpleNamespace(config={"run": {"key": key}})


def test_status_line_counts_stages_eta_and_greedy_soups() -> None:
    soups = [
        {"group": "g1", "trials": 3, "greedy": ["a", "b"], "greedy_id_val_acc": 0.8125},
        {"group": "g2", "trials": 0, "greedy": [], "greedy_id_val_acc": float("nan")},
    ]
    line = status_line(
        {"base": 1, "lp": 2, "target": 8},
        {"base": 1, "lp": 2, "target": 3},
        running=2,
        failed=1,
        elapsed_s=120.0,
        done_here=4,
        soups=soups,
    )
    assert line == (
        "raysoup: 6/11 runs done (base 1/1, lp 2/2, target 3/8), 2 running, 1 failed, "
        "elapsed 2m00s, ETA ~2m00s; greedy: g1 2/3 0.8125"  # 4 left at 30 s a run
    )
    idle = status_line({"aux": 2}, {}, running=0, failed=0, elapsed_s=5, done_here=0)
    assert idle == "raysoup: 0/2 runs done (aux 0/2), 0 running, 0 failed, elapsed 5s"


def test_lines_come_after_changes_at_most_every_every_s() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = SweepProgress(
        {"base": "base", "lp": "lp", "t1": "target", "t2": "target"},
        done_before=["base"],
        every_s=5.0,
        out=out,
        clock=lambda: now[0],
    )
    progress.on_trial_start(0, [], _trial("lp"))  # the first change prints at once
    assert progress.lines == [
        "raysoup: 1/4 runs done (base 1/1, lp 0/1, target 0/2), 1 running, 0 failed, elapsed 0s"
    ]
    now[0] = 1.0
    progress.on_trial_complete(0, [], _trial("lp"))
    progress.on_trial_start(0, [], _trial("t1"))
    progress.on_step_end(0, [])
    assert len(progress.lines) == 1  # within every_s: held back
    now[0] = 6.0
    progress.on_step_end(0, [])
    assert progress.lines[-1].startswith("raysoup: 2/4 runs done (base 1/1, lp 1/1, target 0/2)")
    now[0] = 20.0
    progress.on_step_end(0, [])
    assert len(progress.lines) == 2  # nothing changed: no line
    progress.on_trial_error(0, [], _trial("t1"))  # 14 s later: printed at once
    assert ", 0 running, 1 failed," in progress.lines[-1]
    now[0] = 21.0
    progress.on_trial_start(0, [], _trial("t2"))
    progress.on_trial_complete(0, [], _trial("t2"))
    progress.on_experiment_end([])  # the last change always gets its line
    assert progress.lines[-1].startswith("raysoup: 3/4 runs done")
    assert out.getvalue().splitlines() == progress.lines
