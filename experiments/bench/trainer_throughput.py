"""Trainer throughput: raysoup's ``train_run`` against a bare torch loop, same network, same
batches, same optimizer; and where the trainer's wall time goes.

One target run of a built-in dataset (full fine-tuning from the cached base network,
default hyperparameters: ``batch_size`` images per training env per step) runs three
ways, in turn, ``--repeats`` times (medians reported, all in this process, same torch
threads):

- ``bare torch loop``: the network ``train_run`` builds and its optimizer, over batches
  drawn once beforehand (no data loading, no evaluation): the floor;
- ``train_run, one evaluation``: the trainer, evaluating once at the end
  (``checkpoint_freq = steps``);
- ``train_run, default evaluations``: the trainer with the dataset's evaluation schedule.

Reported: training images per second over the loop without its evaluations, the ratio to
the bare loop (``x_bare``; the goal is >= 0.9), and the shares of the run's wall time
spent evaluating (``eval_share``) and fetching batches (``data_share``, host time of the
batch draw, concatenation and copy to the device), from the timings ``train_run`` records
in its metrics (``loop_s``, ``eval_s``, ``data_s``).

    python experiments/bench/trainer_throughput.py
    python experiments/bench/trainer_throughput.py --steps 600 --repeats 5
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    add_common_arguments,
    device_from_args,
    format_table,
    machine,
    median,
    script_parser,
    synchronize,
    write_rows,
)

MODES = ("bare torch loop", "train_run, one evaluation", "train_run, default evaluations")


def run_spec(
    out: Path, dataset: str, steps: int, freq: int | None, device: torch.device, base: Path
) -> Any:
    """The benchmark run: a full fine-tuning (no head-only phase) from the base network."""
    from raysoup.training.trainer import RunSpec

    return RunSpec(
        dataset=dataset,
        out=out,
        test_env=0,
        steps=steps,
        checkpoint_freq=freq,
        eval_schedule="multiples",
        keep="last",
        hparams={"lp_steps": 0},
        pretrained=base,
        device=str(device),
    )


def bare_loop(spec: Any, device: torch.device) -> dict[str, Any]:
    """The same network, optimizer and batch shapes as ``train_run``, nothing else."""
    from raysoup.data.loaders import train_batches
    from raysoup.data.registry import dataset_class, load_dataset
    from raysoup.data.splits import split_envs, training_envs
    from raysoup.training.hparams import sample_hparams
    from raysoup.training.trainer import _optimizer, build_start_network

    dataset_cls = dataset_class(spec.dataset)
    hparams = sample_hparams(
        spec.dataset, 0, 0, small_images=dataset_cls.SMALL_IMAGES, overrides=spec.hparams
    )
    dataset = load_dataset(spec.dataset, None, augment=bool(hparams["data_augmentation"]))
    splits = split_envs(dataset.env_sizes(), 0, spec.holdout_fraction)
    envs = training_envs(len(dataset.envs), spec.test_env)
    batch_size = int(hparams["batch_size"])
    batches = []
    for i in range(8):  # a few real batches, cycled: the loop never waits for data
        parts = [
            next(train_batches(dataset, env, splits[env].in_indices, batch_size, seed=i))
            for env in envs
        ]
        x = torch.cat([p[0] for p in parts]).to(device)
        y = torch.cat([p[1] for p in parts]).to(device)
        batches.append((x, y))
    torch.manual_seed(0)
    network, _, _ = build_start_network(spec, dataset_cls, hparams)
    network.to(device).train()
    optimizer = _optimizer(list(network.parameters()), hparams)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss_fn(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for x, y in batches:  # warm-up (allocator, kernels), untimed: the floor is the best case
        step(x, y)
    synchronize(device)
    started = time.perf_counter()
    for i in range(spec.steps):
        step(*batches[i % len(batches)])
    synchronize(device)
    loop_s = time.perf_counter() - started
    return {"wall_s": loop_s, "loop_s": loop_s, "eval_s": 0.0, "data_s": 0.0, "images": 0}


def trainer(spec: Any) -> dict[str, Any]:
    from raysoup.training.trainer import train_run

    started = time.perf_counter()
    result = train_run(spec)
    wall_s = time.perf_counter() - started
    return {k: result[k] for k in ("loop_s", "eval_s", "data_s")} | {"wall_s": wall_s}


def images_per_step(spec: Any) -> int:
    from raysoup.data.registry import dataset_class
    from raysoup.training.hparams import sample_hparams

    dataset_cls = dataset_class(spec.dataset)
    hparams = sample_hparams(
        spec.dataset, 0, 0, small_images=dataset_cls.SMALL_IMAGES, overrides=spec.hparams
    )
    return int(hparams["batch_size"]) * (len(dataset_cls.ENVIRONMENTS) - 1)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--dataset", default="MiniRotatedMNIST", help="a built-in dataset")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (median)")
    parser.add_argument(
        "--base", type=Path, default=None, help="base checkpoint (default: the cached built-in)"
    )
    add_common_arguments(parser, "trainer_throughput")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    device = device_from_args(parser, args.device)
    from raysoup.data.registry import dataset_class

    try:
        dataset_class(args.dataset)
    except ValueError as error:
        parser.error(str(error))
    from raysoup.training.trainer import ensure_base_checkpoint

    base = args.base or ensure_base_checkpoint(device=str(device))
    measured: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        freqs = (args.steps, args.steps, None)
        specs = {
            mode: run_spec(Path(tmp), args.dataset, args.steps, freq, device, base)
            for mode, freq in zip(MODES, freqs, strict=True)
        }
        for repeat in range(args.repeats):  # interleaved: a busy moment slows every mode
            for mode, spec in specs.items():
                spec = type(spec)(**{**spec.__dict__, "out": Path(tmp) / f"{repeat}-{mode}"})
                one = bare_loop(spec, device) if mode == MODES[0] else trainer(spec)
                measured[mode].append(one)
    images = args.steps * images_per_step(specs[MODES[0]])
    rows = []
    floor = None
    for mode in MODES:
        runs = measured[mode]
        train_s = median(r["loop_s"] - r["eval_s"] for r in runs)
        per_s = images / train_s
        floor = floor or per_s
        wall = median(r["wall_s"] for r in runs)
        rows.append(
            {
                "mode": mode,
                "dataset": args.dataset,
                "steps": args.steps,
                "images": images,
                "train_s": train_s,
                "wall_s": wall,
                "images_per_s": per_s,
                "x_bare": per_s / floor,
                "eval_share": median(r["eval_s"] / r["wall_s"] for r in runs),
                "data_share": median(r["data_s"] / r["wall_s"] for r in runs),
                "repeats": len(runs),
            }
        )
    info = machine(device)
    rows = [{"script": "trainer_throughput", **row, **info} for row in rows]
    columns = [
        ("mode", ""),
        ("steps", "d"),
        ("images", "d"),
        ("train_s", ".2f"),
        ("wall_s", ".2f"),
        ("images_per_s", ".0f"),
        ("x_bare", ".2f"),
        ("eval_share", ".1%"),
        ("data_share", ".1%"),
    ]
    print(format_table(rows, columns))
    print(f"rows: {write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
