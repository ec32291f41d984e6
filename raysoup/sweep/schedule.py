"""When each run of a sweep may start: as soon as the runs it starts from are done.

All runs of a sweep go into one Tune experiment and share its slots; there is no barrier
between stages. ``RunQueue`` is the pure bookkeeping (testable without Ray): it hands out
runs in plan order (base, LP, auxiliary, target: what unblocks others comes first),
skipping those still waiting for a dependency, and drops the dependants of a run that
failed. ``PlanSearcher`` is the thin Tune ``Searcher`` around it: Tune asks it for the
next trial whenever a slot is free, and ``None`` means "nothing ready yet, ask again".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.search import Searcher

from raysoup.io.atomic import atomic_write_bytes


class RunQueue:
    """Runs waiting, running and over, by key; ``waits_for[key]`` holds the keys of the
    runs that ``key`` starts from (only those still to run: a finished one is no wait)."""

    def __init__(self, order: Sequence[str], waits_for: Mapping[str, Sequence[str]]) -> None:
        unknown = {dep for key in order for dep in waits_for.get(key, ()) if dep not in order}
        if unknown:
            raise ValueError(f"runs wait for runs that are not queued: {sorted(unknown)[:5]}")
        self._pending: list[str] = list(order)
        self._waits_for = {key: set(waits_for.get(key, ())) for key in order}
        self.running: set[str] = set()
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.blocked: dict[str, str] = {}  # key -> the failed run it (transitively) needs

    def next_ready(self) -> str | None:
        """The first waiting run whose dependencies are all done (it is now running)."""
        for i, key in enumerate(self._pending):
            if self._waits_for[key] <= self.done:
                del self._pending[i]
                self.running.add(key)
                return key
        return None

    @property
    def exhausted(self) -> bool:
        """Nothing left to hand out (runs may still be running)."""
        return not self._pending

    def finish(self, key: str, ok: bool) -> None:
        """``key`` ended: done, or failed (then every run needing it is dropped)."""
        self.running.discard(key)
        if ok:
            self.done.add(key)
            return
        self.failed.add(key)
        changed = True
        while changed:  # dependants of dependants, in one pass per level
            changed = False
            for pending in list(self._pending):
                cause = next(
                    (
                        dep
                        for dep in self._waits_for[pending]
                        if dep in self.failed or dep in self.blocked
                    ),
                    None,
                )
                if cause is not None:
                    self._pending.remove(pending)
                    self.blocked[pending] = self.blocked.get(cause, cause)
                    changed = True


class PlanSearcher(Searcher):
    """Tune's source of trials: ``configs[key]`` for each key, in ``RunQueue`` order."""

    def __init__(
        self, configs: Mapping[str, dict[str, Any]], waits_for: Mapping[str, Sequence[str]]
    ) -> None:
        super().__init__()
        self.configs = dict(configs)
        self.queue = RunQueue(list(self.configs), waits_for)
        self.keys: dict[str, str] = {}  # Tune trial id -> run key

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        key = self.queue.next_ready()
        if key is None:
            return Searcher.FINISHED if self.queue.exhausted else None
        self.keys[trial_id] = key
        return {"run": self.configs[key]}

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self.keys:
            self.queue.finish(self.keys[trial_id], ok=not error)

    def save(self, checkpoint_path: str) -> None:
        """For people reading Tune's folder: which runs ended how (never restored: a new
        driver plans again from the checkpoints)."""
        state = {
            "done": sorted(self.queue.done),
            "failed": sorted(self.queue.failed),
            "blocked": self.queue.blocked,
            "running": sorted(self.queue.running),
        }
        atomic_write_bytes(checkpoint_path, json.dumps(state, indent=1).encode())

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("raysoup plans a resumed sweep from its checkpoints")


# ---------------------------------------------------------------- ideal schedules
# What a sweep would take with no orchestration cost at all (benchmarks compare with it).


def critical_path(work: Mapping[str, float], waits_for: Mapping[str, Sequence[str]]) -> float:
    """Seconds of the longest chain of runs each starting from the one before."""
    finish: dict[str, float] = {}

    def finish_of(key: str, seen: frozenset[str] = frozenset()) -> float:
        if key in seen:
            raise ValueError(f"runs wait for each other in a cycle through {key!r}")
        if key not in finish:
            before = [finish_of(dep, seen | {key}) for dep in waits_for.get(key, ())]
            finish[key] = work[key] + max(before, default=0.0)
        return finish[key]

    return max((finish_of(key) for key in work), default=0.0)


def ideal_lower_bound(
    work: Mapping[str, float], waits_for: Mapping[str, Sequence[str]], slots: int
) -> float:
    """No schedule of these runs on ``slots`` slots ends sooner: the larger of the total
    work spread evenly over the slots and the critical path."""
    if slots < 1:
        raise ValueError(f"slots={slots}: expected >= 1")
    return max(sum(work.values()) / slots, critical_path(work, waits_for))


def plan_order_makespan(
    order: Sequence[str],
    work: Mapping[str, float],
    waits_for: Mapping[str, Sequence[str]],
    slots: int,
) -> float:
    """When the last run ends if each free slot at once takes the next ready run of
    ``RunQueue`` (plan order) and runs cost exactly ``work``: raysoup's own scheduling
    without any overhead."""
    if slots < 1:
        raise ValueError(f"slots={slots}: expected >= 1")
    queue = RunQueue(order, waits_for)
    now, running = 0.0, []  # (end time, key)
    while not queue.exhausted or running:
        while len(running) < slots and (key := queue.next_ready()) is not None:
            running.append((now + work[key], key))
        if not running:
            raise ValueError(f"runs can never start: {sorted(set(order) - queue.done)[:5]}")
        running.sort()
        now, key = running.pop(0)
        queue.finish(key, ok=True)
    return now
