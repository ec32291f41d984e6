"""Soups without Ray: post hoc over a sweep's checkpoints (``raysoup soup``), or in the
driver when a resumed sweep has nothing left to train. The same ``SoupMaker`` as the
sweep's soup actor, so the same soups."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from raysoup.devices import resolve_device
from raysoup.io import storage as io_storage
from raysoup.io.checkpoint import CheckpointError
from raysoup.io.storage import Location
from raysoup.soup.greedy import rank_key
from raysoup.soup.group import GroupKey, Offer
from raysoup.soup.maker import METHODS, SoupMaker
from raysoup.sweep.config import SweepConfig
from raysoup.sweep.lease import SweepLease
from raysoup.sweep.plan import PlannedRun, plan_sweep
from raysoup.sweep.record import read_config


def planned_groups(runs: list[PlannedRun]) -> dict[GroupKey, list[str]]:
    """The target runs of each soup group (dataset, test env, trial seed, init)."""
    groups: dict[GroupKey, list[str]] = {}
    for run in runs:
        spec = run.spec
        key = GroupKey(spec["dataset"], spec["test_env"], spec["trial_seed"], spec["init"])
        groups.setdefault(key, []).append(run.key)
    return groups


def incomplete_groups(
    planned: Mapping[GroupKey, list[str]], summary: list[dict[str, Any]]
) -> list[str]:
    """One line per soup group with fewer trials than planned (none: no soups at all)."""
    souped = {group["group"]: group["trials"] for group in summary}
    lines = []
    for key, runs in sorted(planned.items()):
        n = souped.get(key.slug, 0)
        if n == 0:
            lines.append(f"no trial of {key.slug} finished: it has no soups")
        elif n < len(runs):
            lines.append(f"soups of {key.slug} use {n} of {len(runs)} planned trials")
    return lines


def finished_offers(runs: list[PlannedRun]) -> list[Offer]:
    """The soup offers of the planned runs whose checkpoint exists, from their metadata."""
    return [
        Offer.from_checkpoint(run.key, run.spec["out"])
        for run in runs
        if io_storage.is_checkpoint(run.spec["out"])
    ]


def soup_here(
    root: Location, config: SweepConfig, runs: list[PlannedRun]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What the soup actor does with the finished target ``runs``, in this process (a
    sweep with nothing left to train needs no Ray): it restores the actor's saved state,
    so a trial already souped is skipped. Returns the soup rows written now and the
    summary. On the device the actor would use: the CPU unless ``soup_gpus``."""
    device = resolve_device("auto" if config.soup_gpus > 0 else "cpu")
    maker = SoupMaker(
        root,
        config.name,
        expected=planned_groups(runs),
        accept=config.soup_accept,
        data_dir=config.data_dir,
        holdout_fraction=config.holdout_fraction,
        device=device,
        max_models=config.soup_max_models,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    maker.offer(finished_offers(runs))
    return maker.finalize_all(), maker.summary()


def resoup(
    root: Location,
    methods: tuple[str, ...] = METHODS,
    accept: str | None = None,
    device: str = "auto",
) -> list[dict]:
    """Recompute a sweep's soups from its trial checkpoints, without Ray or retraining.

    Writes the same ``soups`` / ``soup_steps`` parts (and soup checkpoints) as the actor,
    replacing them; ``accept`` defaults to the sweep's ``soup_accept``.
    """
    root = io_storage.resolve(root)
    config = read_config(root)
    with SweepLease(root):  # never next to a running sweep's soup actor
        return _resoup_held(root, config, methods, accept, device)


def _resoup_held(
    root: Location, config: SweepConfig, methods: tuple[str, ...], accept: str | None, device: str
) -> list[dict]:
    runs = plan_sweep(config, root).get("target", [])
    offers = finished_offers(runs)
    if not offers:
        raise FileNotFoundError(f"{root}: no finished target trial to soup")
    damaged = [(o.checkpoint, why) for o in offers if (why := io_storage.verify(o.checkpoint))]
    if damaged:  # before any soup is replaced: a soup must not silently lose a trial
        listed = "; ".join(f"{path}: {why}" for path, why in damaged[:5])
        raise CheckpointError(
            f"{len(damaged)} trial checkpoint(s) are damaged ({listed}). Delete the damaged "
            f"folder(s) and run the sweep's command again (it retrains exactly those "
            f"runs), then soup again"
        )
    # Best first, each trial is decided once: the batch order of Recipe 1, fewest evaluations.
    offers.sort(key=lambda offer: rank_key(offer.candidate))
    maker = SoupMaker(
        root,
        config.name,
        accept=accept or config.soup_accept,
        data_dir=config.data_dir,
        holdout_fraction=config.holdout_fraction,
        device=device,
        max_models=config.soup_max_models,
        methods=methods,
        persist=False,
        expected=planned_groups(runs),
    )
    maker.offer(offers)
    return maker.finalize_all()
