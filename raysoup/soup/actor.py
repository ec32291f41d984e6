"""The soup actor (one named, restartable Ray actor per sweep) and the Tune callback
that feeds it.

The actor is a thin shell around ``SoupMaker``: ``__init__`` re-runs on every restart
and restores the maker's state from storage, and ``max_task_retries=-1`` re-delivers a
call that was running when it died; offers are idempotent, so nothing is lost or
counted twice. The callback runs in the Tune driver and never waits: each completed
target trial becomes one fire-and-forget ``offer.remote``.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune

from raysoup.soup.group import GroupKey
from raysoup.soup.maker import SoupMaker

NAMESPACE = "raysoup"
# Reported on a target trial's final result. The trial id travels as "key": Tune
# overwrites "trial_id" in results with its own id.
OFFER_FIELDS = ("checkpoint", "id_val_acc", "content_hash", "test_acc")
GROUP_FIELDS = ("dataset", "test_env", "trial_seed", "init")


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

    def offer(self, offers: list[dict[str, Any]]) -> int:
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


def offer_from_result(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The soup offer in a target trial's final Tune result (``None`` for other trials)."""
    if not result.get("final") or result.get("stage") != "target":
        return None
    offer = {name: result.get(name, math.nan) for name in OFFER_FIELDS}
    offer["trial_id"] = result["key"]
    offer["group"] = {name: result[name] for name in GROUP_FIELDS}
    return offer


class SoupFeeder(tune.Callback):
    """Hands every completed target trial to the soup actor, without waiting for it.

    Tune pickles its callbacks into the experiment state and ``Tuner.restore`` brings them
    back, so the feeder holds the actor's name, not a handle: after a driver restart it
    finds the new actor by name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = 0
        self._actor: ray.actor.ActorHandle | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "sent": 0, "_actor": None}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        offer = offer_from_result(trial.last_result or {})
        if offer is None:
            return
        try:
            if self._actor is None:
                self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
            self._actor.offer.remote([offer])  # fire-and-forget: the driver never blocks
        except (ValueError, ray.exceptions.RayError) as error:
            # Never fail Tune's bookkeeping of the trial (it would not even reuse the
            # trial's worker): the runner hands every finished trial over at the end.
            self._actor = None
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(
                f"raysoup: warning: soup actor {self.name!r} not reached for trial "
                f"{offer['trial_id']} ({first}); it gets the trial when the runs end",
                file=sys.stderr,
            )
            return
        self.sent += 1
