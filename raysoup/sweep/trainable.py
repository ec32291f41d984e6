"""The Tune function trainable: a thin wrapper around ``train_run``.

Tune runs it in long-lived worker processes (``reuse_actors``), one trial after another:
``train_run`` seeds torch's generators from the run alone and every other draw has its
own seeded generator, so a trial gives the same bits in a reused worker as in a fresh
process (``tests/test_worker_reuse.py``); module caches hold only deterministic data.

A base run copies the base network from this node's cache when it was trained the same
way there (``adopt_cached_base``), and leaves a copy there once it trained it.

Idempotent by checkpoint: if the run's checkpoint already exists (the trial finished
before an interruption but Tune had not recorded it), its stored metrics are reported
again instead of retraining. The ``trials`` row is written from the checkpoint's
metadata, keyed by the trial key, so a row is never duplicated.

Tune hears of a trial's evaluations at most every ``PROGRESS_EVERY_S`` seconds (a report
holds the trial until Tune's driver loop takes it, a real cost for short trials) and of
its end with the final metrics and everything the soup actor needs; it gets no Tune
checkpoint (the run's own checkpoint is the one copy).

The checkpoint (``spec.out``) may be a URI: ``train_run`` publishes it there, and the
``checkpoint`` column holds that URI; read it back with
``raysoup.io.storage.local_checkpoint``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from raysoup.contract import HPARAM_COLUMNS

if TYPE_CHECKING:
    from raysoup.io.checkpoint import CheckpointMeta

SCALARS = (int, float, str, bool)
# Seconds between a trial's progress reports to Tune (its evaluations in between are not
# reported; the final result always is).
PROGRESS_EVERY_S = 10.0


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, SCALARS) and not (isinstance(v, float) and math.isnan(v))
    }


def trial_row(sweep: str, key: str, meta: CheckpointMeta, checkpoint: Path | str) -> dict[str, Any]:
    """The ``trials`` row of a finished run, from its checkpoint metadata alone."""
    metrics = meta.metrics
    return {
        "sweep": sweep,
        "stage": meta.stage,
        "trial_id": key,
        "dataset": meta.dataset,
        "test_env": meta.test_env,
        "trial_seed": meta.trial_seed,
        "hparams_seed": meta.hparams_seed,
        "init": meta.init.get("strategy") if meta.stage == "target" else None,
        "init_sources": meta.init.get("sources", []),
        "init_weights": meta.init.get("weights", []),
        # init sources trained on undeclared data (``pool add --undeclared``): marked runs
        "undeclared_sources": int(meta.init.get("undeclared_sources", 0)),
        **{name: meta.hparams.get(name) for name in HPARAM_COLUMNS},
        "id_val_acc": metrics.get("id_val_acc"),
        "test_acc": metrics.get("test_acc", float("nan")),
        **{k: v for k, v in metrics.items() if k.startswith("env") and k.endswith("_acc")},
        "checkpoint": str(checkpoint),
        "content_hash": meta.content_hash,
        "status": "done",
        "wall_s": metrics.get("wall_s"),
        "kept_step": metrics.get("step"),  # the evaluation the checkpoint is (updates done)
    }


def where_ran() -> dict[str, Any]:
    """``node_id`` and ``node_ip`` of the Ray node this trial runs on, and ``worker_pid``,
    the worker process (Tune reuses one for many trials): extra columns."""
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "worker_pid": os.getpid(),
    }


def run_trial(config: dict[str, Any]) -> None:
    """Tune entry point: ``config["run"] = {"key", "spec", "sweep", "results"}``."""
    # Imported here, not with the module: Tune creates a worker by importing this module,
    # and a worker that becomes ready in a second (before torch and torchvision are
    # imported) is not discarded by Tune for the worker of a trial that just ended.
    import torch

    from raysoup.io import storage
    from raysoup.options import from_mapping
    from raysoup.results import ResultsStore
    from raysoup.soup.group import Offer
    from raysoup.training.trainer import RunSpec, adopt_cached_base, cache_base, train_run

    run = config["run"]
    spec = from_mapping(RunSpec, run["spec"], run["key"])
    reused = storage.checkpoint_damage(spec.out) is None  # a damaged one is retrained
    if not reused and (cached := adopt_cached_base(spec)) is not None:
        print(f"raysoup: {run['key']}: copied from this node's cache: {cached}", file=sys.stderr)
    elif not reused:
        last_report = [time.monotonic()]

        def progress(metrics: dict[str, Any]) -> None:
            # Tune blocks the trial on each report until the driver's loop has taken it:
            # a short trial reports only its final result, a long one every few seconds.
            if time.monotonic() - last_report[0] < PROGRESS_EVERY_S:
                return
            tune.report({**_scalars(metrics), "key": run["key"]})
            last_report[0] = time.monotonic()

        try:
            train_run(spec, on_eval=progress)  # reseeds every generator it draws from
        finally:  # the worker lives on for the next trial: give back the accelerator's memory
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        cache_base(spec)  # a base run: the next sweep on this node copies it
    meta = storage.read_meta(spec.out)
    row = trial_row(run["sweep"], run["key"], meta, spec.out)
    row.update(where_ran())  # extra columns: which Ray node ran (or re-reported) the trial
    ResultsStore(run["results"]).append("trials", [row], part_key=run["key"])
    # Everything the soup actor needs rides on the final result (see SoupFeeder).
    offer = Offer.from_meta(run["key"], spec.out, meta) if meta.stage == "target" else None
    # Metrics only: the run's checkpoint (the ``checkpoint`` column) is the one copy; a
    # Tune checkpoint would copy its bytes into Tune's storage once more for every trial.
    tune.report(
        {**_scalars(meta.metrics), "stage": meta.stage, "key": run["key"]}
        | {"reused": reused, "final": True}
        | ({Offer.RESULT_KEY: offer.to_dict()} if offer is not None else {})
    )
