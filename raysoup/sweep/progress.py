"""Live progress of a sweep: one status line at most every ``every_s`` seconds, and only
when something happened, instead of Tune's whole trial table (``tune_verbose`` brings that
back).

    raysoup: 9/14 runs done (base 1/1, lp 2/2, aux 3/3, target 3/8), 2 running, 0 failed,
    elapsed 1m52s, ETA ~1m30s; greedy: MiniRotatedMNIST-e5-s0-fusing 2/3 0.8125

The greedy part is the soup actor's last summary, asked for without waiting (a driver
callback never blocks on ``ray.get``): each line shows the answer to the previous request.
``status_line`` is pure, so it is tested without Ray.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import ray
from ray import tune

from raysoup.contract import STAGES
from raysoup.sweep.soup_actor import NAMESPACE

MAX_GROUPS_SHOWN = 3


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def status_line(
    planned: Mapping[str, int],
    done: Mapping[str, int],
    *,
    running: int,
    failed: int,
    elapsed_s: float,
    done_here: int,
    soups: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The status line. ``planned``/``done``: runs per stage (done before this driver
    included); ``done_here``: runs this driver finished in ``elapsed_s`` (the ETA's rate);
    ``soups``: the soup actor's summary rows."""
    stages = [s for s in STAGES if planned.get(s)]
    total, finished = sum(planned.values()), sum(done.values())
    per_stage = ", ".join(f"{s} {done.get(s, 0)}/{planned[s]}" for s in stages)
    line = (
        f"raysoup: {finished}/{total} runs done ({per_stage}), {running} running, "
        f"{failed} failed, elapsed {_duration(elapsed_s)}"
    )
    left = total - finished - failed
    if done_here and left > 0:
        line += f", ETA ~{_duration(elapsed_s / done_here * left)}"
    shown = [row for row in soups if row.get("trials")][:MAX_GROUPS_SHOWN]
    if shown:
        parts = []
        for row in shown:
            acc = row.get("greedy_id_val_acc")
            acc_text = f" {acc:.4f}" if isinstance(acc, float) and math.isfinite(acc) else ""
            parts.append(f"{row['group']} {len(row.get('greedy', []))}/{row['trials']}{acc_text}")
        more = len([r for r in soups if r.get("trials")]) - len(shown)
        line += "; greedy: " + ", ".join(parts) + (f" (+{more} groups)" if more > 0 else "")
    return line


class SweepProgress(tune.Callback):
    """Prints ``status_line`` after trial events, at most every ``every_s`` seconds (the
    last change always gets its line by the end of the experiment).

    ``stage_of``: every planned run's stage by key; ``done_before``: the keys already done
    when this driver started; ``soup_actor``: the soup actor's name, if there is one.
    Tune pickles callbacks into its experiment state: the state kept here is plain data.
    """

    def __init__(
        self,
        stage_of: Mapping[str, str],
        done_before: Sequence[str],
        soup_actor: str | None = None,
        every_s: float = 5.0,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage_of = dict(stage_of)
        self.planned = Counter(self.stage_of.values())
        self.done = Counter(self.stage_of[key] for key in done_before if key in self.stage_of)
        self.soup_actor = soup_actor
        self.every_s = every_s
        self._out = out
        self._clock = clock
        self._started = clock()
        self._printed_at = -math.inf
        self._changed = False
        self._running: set[str] = set()
        self._failed: set[str] = set()
        self._done_here = 0
        self._soups: list[dict[str, Any]] = []
        self._asked: ray.ObjectRef | None = None
        self.lines: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_out": None, "_asked": None}

    @staticmethod
    def _key(trial: Any) -> str | None:
        return (getattr(trial, "config", None) or {}).get("run", {}).get("key")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        if key is not None:
            self._running.add(key)
            self._changed = True
            self._maybe_print()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        if key in self.stage_of and key in self._running:
            self._running.discard(key)
            self.done[self.stage_of[key]] += 1
            self._done_here += 1
            self._changed = True
            self._maybe_print()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        if key is not None:
            self._running.discard(key)
            self._failed.add(key)
            self._changed = True
            self._maybe_print()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._maybe_print()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._maybe_print(force=True)

    def _poll_soups(self) -> None:
        """Take the actor's answer if it came, and ask again; never waits."""
        if self.soup_actor is None:
            return
        try:
            if self._asked is not None and ray.wait([self._asked], timeout=0)[0]:
                self._soups = ray.get(self._asked)
                self._asked = None
            if self._asked is None:
                actor = ray.get_actor(self.soup_actor, namespace=NAMESPACE)
                self._asked = actor.summary.remote()
        except (ValueError, ray.exceptions.RayError):
            self._asked = None  # restarting or gone: the next line asks again

    def _maybe_print(self, force: bool = False) -> None:
        now = self._clock()
        if not self._changed or (not force and now - self._printed_at < self.every_s):
            return
        self._poll_soups()
        line = status_line(
            self.planned,
            self.done,
            running=len(self._running),
            failed=len(self._failed),
            elapsed_s=now - self._started,
            done_here=self._done_here,
            soups=self._soups,
        )
        print(line, file=self._out or sys.stderr, flush=True)
        self.lines.append(line)
        self._printed_at = now
        self._changed = False
