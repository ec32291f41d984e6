"""Probe the nuisance benchmark: one LP, a few target runs at one lr, and their soups.

    python experiments/bench/nuisance_probe.py --workdir /tmp/probe --lr 3e-4 --hs 1 2 3 4

Trains (or reuses, by folder) the LP of (NuisanceMNIST, --test-env, --trial-seed) on the
shipped foundation, then target runs from its head (pretrained init, hparams seeds --hs,
lr forced to --lr), and prints one JSON line: each run's (ID-val, test) accuracy, the
ERM pick (best ID-val), the uniform soup, Recipe-1 greedy soup (``>=``) and the logit
ensemble. The numbers in the README's "Nuisance benchmark" paragraph come from
``--lr 1e-4 --hs 1``, ``--lr 3e-4 --hs 1 2 3 4`` and ``--lr 1e-3 --hs 1 2 3 4``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raysoup.data.loaders import eval_batches
from raysoup.data.nuisance import NUISANCE_TARGET
from raysoup.data.registry import load_dataset
from raysoup.data.splits import split_envs, training_envs
from raysoup.io.checkpoint import is_checkpoint, load_checkpoint, read_meta
from raysoup.models.networks import build_network
from raysoup.training.trainer import RunSpec, train_run

State = dict[str, torch.Tensor]


def _run(spec: dict, out: Path) -> dict:
    if not is_checkpoint(out):
        train_run(RunSpec(out=out, device="cpu", **spec))
    return read_meta(out).metrics


def _logits(state: State, dataset, parts, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    network = build_network("glyphcnn", num_classes)
    network.load_state_dict(state)
    network.eval()
    outs, ys = [], []
    with torch.no_grad():
        for env, indices in parts:
            for x, y in eval_batches(dataset, env, indices, 512):
                outs.append(network(x).double())
                ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def _average(states: list[State]) -> State:
    return {k: sum(s[k].double() for s in states).div(len(states)).float() for k in states[0]}


def soups(paths: list[Path], test_env: int, trial_seed: int) -> dict:
    dataset = load_dataset(NUISANCE_TARGET)
    splits = split_envs(dataset.env_sizes(), trial_seed)
    val = [(e, splits[e].out_indices) for e in training_envs(len(dataset.envs), test_env)]
    whole = np.concatenate([splits[test_env].in_indices, splits[test_env].out_indices])
    test = [(test_env, whole)]
    c = dataset.NUM_CLASSES

    def score(state: State) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        lv, yv = _logits(state, dataset, val, c)
        lt, yt = _logits(state, dataset, test, c)
        acc_v = (lv.argmax(1) == yv).double().mean().item()
        acc_t = (lt.argmax(1) == yt).double().mean().item()
        return acc_v, acc_t, lv, lt

    states = [load_checkpoint(p)[0] for p in paths]
    each = [score(s) for s in states]
    _, yv = _logits(states[0], dataset, val, c)
    _, yt = _logits(states[0], dataset, test, c)
    ensemble = (
        (sum(e[2] for e in each).argmax(1) == yv).double().mean().item(),
        (sum(e[3] for e in each).argmax(1) == yt).double().mean().item(),
    )
    order = sorted(range(len(states)), key=lambda i: -each[i][0])
    soup, best = [order[0]], each[order[0]][0]
    for i in order[1:]:
        accuracy = score(_average([states[j] for j in [*soup, i]]))[0]
        if accuracy >= best:
            soup, best = [*soup, i], accuracy
    uniform = score(_average(states))
    greedy = score(_average([states[j] for j in soup]))
    erm = each[order[0]]
    return {
        "runs": [(round(e[0], 4), round(e[1], 4)) for e in each],
        "erm": erm[:2],
        "uniform": uniform[:2],
        "greedy": greedy[:2],
        "greedy_n": len(soup),
        "ensemble": ensemble,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--test-env", type=int, default=2)
    parser.add_argument("--trial-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--hs", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lp-steps", type=int, default=300)
    parser.add_argument("--checkpoint-freq", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    common = {
        "dataset": NUISANCE_TARGET,
        "test_env": args.test_env,
        "trial_seed": args.trial_seed,
        "checkpoint_freq": args.checkpoint_freq,
    }
    lp = args.workdir / f"lp-e{args.test_env}-s{args.trial_seed}"
    metrics = _run({**common, "stage": "lp", "steps": args.lp_steps}, lp)
    print(f"LP id_val {metrics['id_val_acc']:.4f} test {metrics['test_acc']:.4f}", file=sys.stderr)
    paths = []
    for h in args.hs:
        started = time.time()
        out = args.workdir / f"lr{args.lr:g}" / f"h{h}"
        spec = {**common, "hparams_seed": h, "steps": args.steps, "lp_head": lp}
        metrics = _run({**spec, "hparams": {"lr": args.lr}, "keep": "last"}, out)
        print(
            f"run h{h}: id_val {metrics['id_val_acc']:.4f} test {metrics['test_acc']:.4f} "
            f"({time.time() - started:.0f} s)",
            file=sys.stderr,
        )
        paths.append(out)
    print(json.dumps(soups(paths, args.test_env, args.trial_seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
