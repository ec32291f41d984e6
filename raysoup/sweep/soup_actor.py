"""The soup actor (one named, restartable Ray actor per sweep) and the Tune callback
that feeds it.

The actor is a thin shell around ``SoupMaker``: ``__init__`` re-runs on every restart
and restores the maker's state from storage, and ``max_task_retries=-1`` re-delivers a
call that was running when it died; offers are idempotent, so nothing is lost or
counted twice. The callback runs in the Tune driver and never waits: completed target
trials go to the actor in fire-and-forget ``offer.remote`` batches.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune

from raysoup.soup.group import GroupKey, Offer
from raysoup.soup.maker import SoupMaker

NAMESPACE = "raysoup"


def actor_name(sweep: str, root: str | Path) -> str:
    """Unique per sweep *folder*: two sweeps of one name under different storages (in one
    Ray cluster) must not share an actor."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
    return f"soup:{sweep}:{digest}"


class SoupActor:
    """Holds a ``SoupMaker``; every method returns quickly except ``finalize``."""

    def __init__(self, root: str, sweep: str, expected: list[tuple[dict, list[str]]], **options):
        self.maker = SoupMaker(
            root,
            sweep,
            expected={GroupKey(**key): ids for key, ids in expected},
            log=lambda line: print(line, file=sys.stdout, flush=True),
            **options,
        )

    def offer(self, offers: list[Offer]) -> int:
        """Soup finished trials (re-deliveries are no-ops); returns groups changed."""
        return len(self.maker.offer(offers))

    def finalize(self) -> list[dict[str, Any]]:
        """Write every group's final soups; returns the rows written now."""
        return self.maker.finalize_all()

    def summary(self) -> list[dict[str, Any]]:
        return self.maker.summary()

    def pid(self) -> int:
        """The actor's process id (a restart gives a new one)."""
        return os.getpid()

    def cpu_s(self) -> float:
        """CPU seconds this actor's process has used (its soup work, for benchmarks)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this actor's process (Linux: ``ru_maxrss`` in KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_soup_actor(
    root: str | Path,
    sweep: str,
    expected: Mapping[GroupKey, list[str]],
    *,
    num_cpus: float = 0.0,
    num_gpus: float = 0.0,
    **options: Any,
) -> ray.actor.ActorHandle:
    """The sweep's soup actor: the running one, or a new one that restores the state."""
    remote = ray.remote(SoupActor).options(
        name=actor_name(sweep, root),
        namespace=NAMESPACE,
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    plan = [(key.__dict__, sorted(ids)) for key, ids in sorted(expected.items())]
    return remote.remote(str(root), sweep, plan, **options)


def offer_from_result(result: Mapping[str, Any]) -> Offer | None:
    """The soup offer in a target trial's final Tune result (``None`` for other trials)."""
    data = result.get(Offer.RESULT_KEY) if result.get("final") else None
    return Offer.from_dict(data) if data else None


class SoupFeeder(tune.Callback):
    """Hands every completed target trial to the soup actor, without waiting for it.

    Trials that finish are kept and sent together, at most every ``every_s`` seconds and
    never while the actor is still busy with the last batch (both checked without
    blocking, at each step of Tune's loop): the actor decides a batch's ranks once instead
    of once per trial, so it keeps up with many short trials at a fraction of the work.
    A lost batch is harmless: the runner hands every finished trial over at the end
    (offers are idempotent).

    Tune pickles its callbacks into the experiment state and ``Tuner.restore`` brings them
    back, so the feeder holds the actor's name, not a handle: after a driver restart it
    finds the new actor by name.
    """

    def __init__(self, name: str, every_s: float = 0.0) -> None:
        self.name = name
        self.every_s = every_s
        self._actor: ray.actor.ActorHandle | None = None
        self._waiting: list[Offer] = []
        self._in_flight: ray.ObjectRef | None = None
        self._sent_at = -math.inf

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_actor": None, "_waiting": [], "_in_flight": None}

    @property
    def waiting(self) -> list[str]:
        """Trial ids kept until the actor is done with the batch it has."""
        return [offer.trial_id for offer in self._waiting]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        offer = offer_from_result(trial.last_result or {})
        if offer is not None:
            self._waiting.append(offer)
            self._send()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._waiting:
            self._send()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._waiting:
            self._send(even_if_busy=True)

    def _send(self, even_if_busy: bool = False) -> None:
        if not even_if_busy:
            if time.monotonic() - self._sent_at < self.every_s:
                return
            if self._in_flight is not None and not ray.wait([self._in_flight], timeout=0)[0]:
                return
        batch, self._waiting = self._waiting, []
        self._sent_at = time.monotonic()
        try:
            if self._actor is None:
                self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
            self._in_flight = self._actor.offer.remote(batch)  # fire-and-forget
        except (ValueError, ray.exceptions.RayError) as error:
            # Never fail Tune's bookkeeping of the trial (it would not even reuse the
            # trial's worker): the runner hands every finished trial over at the end.
            self._actor = self._in_flight = None
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            ids = ", ".join(offer.trial_id for offer in batch)
            print(
                f"raysoup: warning: soup actor {self.name!r} not reached for trial(s) {ids} "
                f"({first}); it gets them when the runs end",
                file=sys.stderr,
            )
