"""Time to soup: from the last trial finishing to the final soups being written.

For sweeps of k trials (real short trainings of the built-in MiniRotatedMNIST, one soup
group, hparams seeds 0..k-1, ``lp_steps: 0``), the trials "finish" in a random order and
each arrival is handed to the soup at once; what is timed is the soup work left after the
LAST arrival, side by side:

- ``streaming-actor``: the sweep's soup actor (``start_soup_actor``, on a local Ray), fed
  one ``offer.remote`` per arrival as the Tune callback does, then ``finalize``;
- ``streaming-maker``: the same ``SoupMaker`` in this process (no Ray);
- ``posthoc-resoup``: after the last trial, read every checkpoint's metadata and soup them
  all at once with a fresh ``SoupMaker`` in plan order, as ``raysoup soup`` (``resoup``)
  does;
- ``posthoc-sorted``: the same, offered best first: plain batch Recipe 1 (k-1 evaluations).

``--last best`` makes the best trial arrive last: the streaming worst case, where the whole
ranking below it is decided again after the last arrival.

``decide_s`` is until the greedy soup is known, ``finalize_s`` writing the erm / uniform /
greedy rows and checkpoints (uniform: every trial loaded once more; test accuracies),
``delay_s`` their sum. Arrivals are assumed spaced by more than the soup work (each
offer is processed before the next trial finishes: trials take minutes, a soup
evaluation of these networks milliseconds). The trials are trained once and kept under
``--workdir`` (default: a temporary folder).

    python experiments/bench/time_to_soup.py
    python experiments/bench/time_to_soup.py --k 10 20 40 80 --workdir /tmp/tts --device cuda
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Sequence
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
    start_local_ray,
    write_rows,
)

DATASET = "MiniRotatedMNIST"
TEST_ENV = 5
LP_STEPS = 50
MODES = ("streaming-actor", "streaming-maker", "posthoc-resoup", "posthoc-sorted")
Counts = dict[str, int]


def make_trials(
    root: Path, n: int, steps: int, base: Path | None = None, lp_steps: int = LP_STEPS
) -> list[Path]:
    """``n`` real short target trials of one group (hparams seeds 0..n-1), all starting from
    one linear-probe head as in a sweep; kept if already present under ``root``."""
    from raysoup.io.checkpoint import is_checkpoint
    from raysoup.training.trainer import RunSpec, ensure_base_checkpoint, train_run

    base = base or ensure_base_checkpoint(device="cpu")
    common = {"dataset": DATASET, "test_env": TEST_ENV, "pretrained": base, "device": "cpu"}
    lp = root / "lp"
    if not is_checkpoint(lp):
        train_run(RunSpec(out=lp, stage="lp", steps=lp_steps, **common))
    paths = []
    for h in range(n):
        path = root / f"target-h{h:03d}"
        paths.append(path)
        if is_checkpoint(path):
            continue
        spec = RunSpec(
            out=path,
            hparams_seed=h,
            steps=steps,
            checkpoint_freq=steps,
            hparams={"lp_steps": 0},
            lp_head=lp,
            **common,
        )
        train_run(spec)
    return paths


def offers_of(paths: Sequence[Path]) -> list[Any]:
    """The soup offers of these trials (from their checkpoints' metadata), in plan order."""
    from raysoup.soup.group import Offer

    return [Offer.from_checkpoint(path.name, path) for path in paths]


LAST = ("random", "best")


def arrival_order(offers: Sequence[Any], seed: int, last: str = "random") -> list[Any]:
    """A seeded random order; ``last="best"`` then moves the best trial to the end (the
    streaming worst case: every decision below it is made again)."""
    from raysoup.soup.greedy import rank_key

    if last not in LAST:
        raise ValueError(f"last={last!r}: expected one of {LAST}")
    order = list(offers)
    random.Random(seed).shuffle(order)
    if last == "best":
        best = min(order, key=lambda o: rank_key(o.candidate))
        order.remove(best)
        order.append(best)
    return order


def _quiet(_: str) -> None:
    pass


def maker_counts(maker: Any) -> Counts:
    """Greedy evaluations, memo hits, checkpoint loads and all scorings of a one-group maker."""
    group = next(iter(maker.groups.values()))
    return {
        "evals": group.greedy.n_evaluations,
        "memo_hits": group.greedy.memo_hits,
        "loads": group.states.n_loads,
        "scorings": maker.n_scorings,
    }


def greedy_of(maker: Any) -> list[str]:
    return list(next(iter(maker.groups.values())).greedy.ingredients)


def _row(
    mode: str, before: Counts, after: Counts, times: tuple[float, float, float], soup: list[str]
) -> dict[str, Any]:
    t0, t1, t2 = times
    return {
        "mode": mode,
        "decide_s": t1 - t0,
        "finalize_s": t2 - t1,
        "delay_s": t2 - t0,
        "evals_after": after["evals"] - before["evals"],
        "evals_total": after["evals"],
        "memo_hits_after": after["memo_hits"] - before["memo_hits"],
        "memo_hits_total": after["memo_hits"],
        "loads_after": after["loads"] - before["loads"],
        "greedy_size": len(soup),
        "greedy": soup,
    }


def streaming_maker(arrivals: Sequence[Any], root: Path, device: torch.device) -> dict[str, Any]:
    """A ``SoupMaker`` (persisted, as in the actor) fed one trial per arrival."""
    from raysoup.soup.maker import SoupMaker

    maker = SoupMaker(root, "tts", device=str(device), log=_quiet)
    for offer in arrivals[:-1]:
        maker.offer([offer])
    before = maker_counts(maker)
    t0 = time.perf_counter()
    maker.offer([arrivals[-1]])
    t1 = time.perf_counter()
    maker.finalize_all()
    t2 = time.perf_counter()
    return _row("streaming-maker", before, maker_counts(maker), (t0, t1, t2), greedy_of(maker))


def _actor_counts(actor: Any) -> Counts:
    # Runs inside the actor (``__ray_call__``): a lambda, so it is pickled by value.
    fetch = lambda self: (  # noqa: E731
        lambda g, m: {
            "evals": g.greedy.n_evaluations,
            "memo_hits": g.greedy.memo_hits,
            "loads": g.states.n_loads,
            "scorings": m.n_scorings,
            "greedy": list(g.greedy.ingredients),
        }
    )(next(iter(self.maker.groups.values())), self.maker)
    import ray

    return ray.get(actor.__ray_call__.remote(fetch))


def streaming_actor(
    arrivals: Sequence[Any], root: Path, device: torch.device, sweep: str
) -> dict[str, Any]:
    """The real soup actor, one ``offer.remote`` per arrival (each processed before the next)."""
    import ray

    from raysoup.sweep.soup_actor import start_soup_actor

    gpus = 1.0 if device.type == "cuda" else 0.0
    actor = start_soup_actor(root, sweep, {}, num_gpus=gpus, device=str(device))
    try:
        for offer in arrivals[:-1]:
            ray.get(actor.offer.remote([offer.to_dict()]))
        before = _actor_counts(actor)
        t0 = time.perf_counter()
        ray.get(actor.offer.remote([arrivals[-1].to_dict()]))
        t1 = time.perf_counter()
        ray.get(actor.finalize.remote())
        t2 = time.perf_counter()
        after = _actor_counts(actor)
    finally:
        ray.kill(actor, no_restart=True)
    return _row("streaming-actor", before, after, (t0, t1, t2), after["greedy"])


def posthoc(paths: Sequence[Path], root: Path, device: torch.device, ranked: bool) -> dict:
    """After the last trial: read every trial's metadata, soup them all, write the soups."""
    from raysoup.soup.greedy import rank_key
    from raysoup.soup.maker import SoupMaker

    zero = {"evals": 0, "memo_hits": 0, "loads": 0, "scorings": 0}
    t0 = time.perf_counter()
    offers = offers_of(paths)
    if ranked:
        offers.sort(key=lambda o: rank_key(o.candidate))
    maker = SoupMaker(root, "tts", device=str(device), persist=False, log=_quiet)
    maker.offer(offers)
    t1 = time.perf_counter()
    maker.finalize_all()
    t2 = time.perf_counter()
    mode = "posthoc-sorted" if ranked else "posthoc-resoup"
    return _row(mode, zero, maker_counts(maker), (t0, t1, t2), greedy_of(maker))


def run_k(
    paths: Sequence[Path],
    modes: Sequence[str],
    workdir: Path,
    device: torch.device,
    seed: int,
    repeats: int = 1,
    last: str = "random",
) -> list[dict[str, Any]]:
    """Every mode on the first ``len(paths)`` trials, arriving in one seeded random order;
    ``repeats`` rounds, modes shuffled in each, times are medians over the rounds."""
    k = len(paths)
    arrivals = arrival_order(offers_of(paths), seed + k, last)

    def run(mode: str, out: Path, rep: int) -> dict[str, Any]:
        if mode == "streaming-actor":
            return streaming_actor(arrivals, out, device, f"tts-{k}-{seed}-{rep}")
        if mode == "streaming-maker":
            return streaming_maker(arrivals, out, device)
        return posthoc(paths, out, device, ranked=mode == "posthoc-sorted")

    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    order = list(modes)
    for rep in range(repeats):
        random.Random(seed * 1000 + k * 10 + rep).shuffle(order)
        for mode in order:
            out = Path(tempfile.mkdtemp(prefix=f"{mode}-k{k}-", dir=workdir))
            runs[mode].append(run(mode, out, rep))
    rows = [{**_median_row(k, seed + k, runs[mode]), "last": last} for mode in modes]
    reference = next((r for r in rows if r["mode"].startswith("posthoc")), rows[0])
    for row in rows:
        row["same_soup"] = row["greedy"] == reference["greedy"]
        row["x_posthoc"] = row["delay_s"] / reference["delay_s"]
    return rows


def _median_row(k: int, arrival_seed: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's counts (deterministic) with the median times over every run."""
    row = {"k": k, "arrival_seed": arrival_seed, **runs[0], "repeats": len(runs)}
    for name in ("decide_s", "finalize_s", "delay_s"):
        row[name] = median(r[name] for r in runs)
    row["delay_min_s"] = min(r["delay_s"] for r in runs)
    row["delay_max_s"] = max(r["delay_s"] for r in runs)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 40], help="sweep sizes")
    parser.add_argument("--steps", type=int, default=30, help="training steps per trial")
    parser.add_argument(
        "--base", type=Path, default=None, help="pretrained checkpoint (default: built-in base)"
    )
    parser.add_argument("--lp-steps", type=int, default=LP_STEPS, help="steps of the LP head")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival orders")
    parser.add_argument("--orders", type=int, default=1, help="random arrival orders per k")
    parser.add_argument(
        "--last", choices=LAST, default="random", help="best: the best trial arrives last"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the trials")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per k (median times)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here (the actor: 1)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    add_common_arguments(parser, "time_to_soup")
    args = parser.parse_args(argv)
    if (
        min(args.k) < 2
        or args.steps < 1
        or args.lp_steps < 1
        or args.repeats < 1
        or args.threads < 1
        or args.orders < 1
    ):
        parser.error("--k values must be >= 2; --steps, --repeats, --threads, --orders >= 1")
    torch.set_num_threads(args.threads)
    device = device_from_args(parser, args.device)
    with tempfile.TemporaryDirectory(prefix="tts-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths = make_trials(
            workdir / "trials", max(args.k), args.steps, base=args.base, lp_steps=args.lp_steps
        )
        print(f"{len(paths)} trials ready in {time.perf_counter() - started:.0f} s")
        if "streaming-actor" in args.modes:
            start_local_ray(Path(tmp) / "ray", args.cpus)
        try:
            rows = []
            for k in sorted(args.k):
                for order in range(args.orders):
                    seed = args.seed + 7919 * order
                    rows += run_k(
                        paths[:k], args.modes, workdir, device, seed, args.repeats, args.last
                    )
        finally:
            if "streaming-actor" in args.modes:
                import ray

                ray.shutdown()
    info = machine(device)
    rows = [{"script": "time_to_soup", "steps": args.steps, **row, **info} for row in rows]
    print(f"time from the last trial's arrival to the final soups; {info['device']}")
    columns = [
        ("k", "d"),
        ("arrival_seed", "d"),
        ("mode", ""),
        ("decide_s", ".3f"),
        ("finalize_s", ".3f"),
        ("delay_s", ".3f"),
        ("delay_min_s", ".3f"),
        ("x_posthoc", ".2f"),
        ("evals_after", "d"),
        ("evals_total", "d"),
        ("memo_hits_after", "d"),
        ("memo_hits_total", "d"),
        ("loads_after", "d"),
        ("greedy_size", "d"),
        ("same_soup", ""),
    ]
    print(format_table(rows, columns))
    print(f"rows: {write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
