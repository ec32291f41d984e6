"""When do soups pay? The defaults study (by ID-val only) and the regime study.

    python experiments/bench/soup_regimes.py steps   --workdir W   # the defaults study
    python experiments/bench/soup_regimes.py regimes --workdir W   # the regime study
    python experiments/bench/soup_regimes.py by-lr --sweep runs/method_table  # no training

Both train runs with raysoup's own trainer (``train_run``: an LP per (dataset, test env,
foundation) on trial seed 0's splits, shared by every trial seed as in the reference,
then target runs from its head, best ID-val step kept) on 2 processes of one thread, and
soup them with raysoup's own soup code (``uniform_average``, ``batch_greedy``,
``SoupEvaluator``). Finished runs are reused by folder, so a second call only re-soups.

``steps`` — the defaults study, on the tuning case only (NuisanceMNIST, test env 2,
trial seed 0, the shipped foundation): 2 runs per lr in ``--lrs``, ``--steps`` long,
evaluated every 50 steps; prints the mean ID-val accuracy along training per lr and the
step where it reaches its plateau (first evaluation within ``--plateau`` of the best).
Test accuracy is printed for the record and is never used to choose anything.

``regimes`` — the gain of the uniform and greedy soups and of the logit ensemble over
ERM (the best run by ID-val) when one thing changes at a time from the default recipe
(``--n`` runs of the diwa registry, 300 steps, the shipped foundation, NuisanceMNIST
test env 2): the lr (every run at one lr), the foundation's strength (none: a random
featurizer; weak: the shipped recipe stopped at 300 steps; shipped) and the shift (another
NuisanceMNIST test env; MiniRotatedMNIST's 75-degree env, the old built-in benchmark's
extrapolation). Trial seeds ``--seeds``; mean ± SE (DomainBed's) over them; rows to
Parquet and the picture to ``--plot``.

``by-lr`` — a finished sweep's target groups split by learning rate: for each (init,
trial seed) the soups of the whole group (what the sweep's soup actor made: a check) and
of its runs at each lr, with no training.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS_DIR, format_table, script_parser, write_rows

from raysoup.data.builtin import BUILTIN_TARGET
from raysoup.data.nuisance import NUISANCE_TARGET
from raysoup.io.atomic import atomic_write_bytes
from raysoup.io.checkpoint import is_checkpoint, load_checkpoint, read_meta
from raysoup.models.foundation import (
    FOUNDATION_CHARS,
    FoundationRecipe,
    evaluate_foundation,
    foundation_dir,
    save_foundation,
    train_foundation,
)
from raysoup.models.networks import build_network
from raysoup.soup import Candidate, batch_greedy, uniform_average
from raysoup.soup.evaluator import DataKey, GroupData, SoupEvaluator
from raysoup.training.trainer import RunSpec, train_run

METHODS = ("erm", "uniform", "greedy", "ensemble")


@dataclass(frozen=True)
class Case:
    """One group recipe: what changes from the default is named by ``factor``/``label``."""

    factor: str
    label: str
    dataset: str = NUISANCE_TARGET
    test_env: int = 2
    lr: float | None = None  # None: the registry's draws
    foundation: str = "shipped"  # shipped | weak | none (glyphcnn only)
    steps: int | None = None  # None: the dataset's N_STEPS

    @property
    def folder(self) -> str:
        lr = "registry" if self.lr is None else f"lr{self.lr:g}"
        steps = "" if self.steps is None else f"-{self.steps}steps"
        return f"{self.dataset}-e{self.test_env}-{self.foundation}-{lr}{steps}"


DEFAULT = Case("default", "default")


def regime_cases() -> list[Case]:
    return [
        DEFAULT,
        *(replace(DEFAULT, factor="lr", label=f"{lr:g}", lr=lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3)),
        replace(DEFAULT, factor="foundation", label="none", foundation="none"),
        replace(DEFAULT, factor="foundation", label="weak", foundation="weak"),
        replace(DEFAULT, factor="shift", label="NuisanceMNIST env 0", test_env=0),
        replace(DEFAULT, factor="shift", label="MiniRotatedMNIST 75 deg", dataset=BUILTIN_TARGET,
                test_env=5, foundation="base"),
    ]  # fmt: skip


# ------------------------------------------------------------------ foundations


def foundation_path(name: str, workdir: Path) -> Path | None:
    """The checkpoint whose featurizer is 'pretrained' (None: the dataset's default)."""
    if name in ("shipped", "base"):
        return None
    out = workdir / "foundations" / name
    if is_checkpoint(out):
        return out
    if name == "weak":  # the shipped recipe, stopped early
        recipe = FoundationRecipe(steps=300)
        state, metrics = train_foundation(recipe, log=lambda line: print(line, file=sys.stderr))
    elif name == "none":  # a random featurizer: no pretraining at all
        recipe = FoundationRecipe(steps=0)
        torch.manual_seed(recipe.seed)
        network = build_network("glyphcnn", len(FOUNDATION_CHARS))
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        metrics = {"val_acc": evaluate_foundation(network), "wall_s": 0.0}
    else:
        raise ValueError(f"foundation {name!r}: expected shipped, weak or none")
    save_foundation(state, metrics, recipe, out)
    return out


def foundation_acc(name: str, workdir: Path) -> float:
    path = foundation_path(name, workdir) or foundation_dir()
    return float(read_meta(path).metrics.get("val_acc", math.nan)) if name != "base" else math.nan


# ------------------------------------------------------------------ training


def _history_file(out: Path | str) -> Path:
    return Path(f"{out}.history.json")  # beside the checkpoint folder, never inside it


def _train(spec: RunSpec) -> dict[str, Any]:
    """One run in a worker process (one thread): its metrics and evaluation history."""
    torch.set_num_threads(1)
    if not is_checkpoint(spec.out):
        result = train_run(spec)
        atomic_write_bytes(_history_file(spec.out), json.dumps(result["history"]).encode())
    history = _history_file(spec.out)
    return {
        **read_meta(spec.out).metrics,
        "history": json.loads(history.read_text()) if history.exists() else None,
    }


def lp_spec(case: Case, workdir: Path, steps: int | None = None) -> RunSpec:
    out = workdir / "lp" / f"{case.dataset}-e{case.test_env}-{case.foundation}"
    return RunSpec(
        dataset=case.dataset,
        out=out,
        test_env=case.test_env,
        trial_seed=0,
        stage="lp",
        pretrained=foundation_path(case.foundation, workdir),
        steps=steps,
        device="cpu",
    )


def run_specs(
    case: Case, seed: int, n: int, workdir: Path, lp_steps: int | None = None
) -> list[RunSpec]:
    lp = lp_spec(case, workdir, lp_steps)
    return [
        RunSpec(
            dataset=case.dataset,
            out=workdir / "runs" / case.folder / f"s{seed}" / f"h{h}",
            test_env=case.test_env,
            trial_seed=seed,
            hparams_seed=h,
            stage="target",
            pretrained=lp.pretrained,
            lp_head=lp.out,
            steps=case.steps,
            hparams={} if case.lr is None else {"lr": case.lr},
            device="cpu",
        )
        for h in range(n)
    ]


def train_all(specs: Sequence[RunSpec], workers: int) -> list[dict[str, Any]]:
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_train, specs))


# ------------------------------------------------------------------ soups


def group_soups(paths: Sequence[Path]) -> dict[str, Any]:
    """ERM, uniform, greedy (Recipe 1, >=) and ensemble of one group: (ID-val, test) each."""
    metas = {str(p): read_meta(p) for p in paths}
    meta = next(iter(metas.values()))
    data = GroupData(DataKey.of(meta), None, 0.2)
    evaluator = SoupEvaluator(data, meta, torch.device("cpu"))
    states = {key: load_checkpoint(key)[0] for key in metas}
    everyone = sorted(states)

    def soup(keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return uniform_average(states[k] for k in sorted(keys))

    def score(keys: Sequence[str]) -> tuple[float, float]:
        weights = soup(keys)
        return evaluator.id_val_acc(weights), evaluator.test_acc(weights)

    candidates = [
        Candidate(k, float(m.metrics["id_val_acc"]), m.content_hash) for k, m in metas.items()
    ]
    decisions = batch_greedy(candidates, lambda ids: evaluator.id_val_acc(soup(list(ids))))
    greedy = [d.trial_id for d in decisions if d.accepted]
    erm = metas[decisions[0].trial_id].metrics
    logits = (evaluator.trial_logits(states[k]) for k in everyone)
    return {
        "erm": (float(erm["id_val_acc"]), float(erm["test_acc"])),
        "uniform": score(everyone),
        "greedy": score(greedy),
        "ensemble": evaluator.ensemble_accs(logits),
        "greedy_n": len(greedy),
        "runs_id_val": [float(m.metrics["id_val_acc"]) for m in metas.values()],
        "runs_test": [float(m.metrics["test_acc"]) for m in metas.values()],
    }


def soup_columns(soups: dict[str, Any]) -> dict[str, Any]:
    """The columns of one group's row that ``group_soups`` gives (runs, greedy size, and
    the ID-val and test accuracy of each method)."""
    columns: dict[str, Any] = {
        "runs_id_val_mean": statistics.fmean(soups["runs_id_val"]),
        "runs_test_mean": statistics.fmean(soups["runs_test"]),
        "greedy_n": soups["greedy_n"],
    }
    for method in METHODS:
        columns[f"{method}_id_val_acc"], columns[f"{method}_test_acc"] = soups[method]
    return columns


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and DomainBed's SE (std / sqrt(n), population std) in points."""
    values = [100 * v for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values) / math.sqrt(len(values))


def fmt(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.1f} ± {pair[1]:.1f}"


# ------------------------------------------------------------------ studies


def steps_study(args: Any) -> int:
    case = replace(DEFAULT, factor="steps", label="steps", steps=args.steps)
    lp = lp_spec(case, args.workdir, args.lp_steps)
    lp_metrics = train_all([lp], 1)[0]
    specs = []
    for lr in args.lrs:
        specs += run_specs(replace(case, lr=lr), 0, args.runs, args.workdir, args.lp_steps)
    results = train_all(specs, args.workers)
    if any(r["history"] is None for r in results):
        raise SystemExit("a run without its history file: delete it from --workdir and rerun")
    rows = []
    for i, lr in enumerate(args.lrs):
        group = results[i * args.runs : (i + 1) * args.runs]
        curve: dict[int, list[tuple[float, float]]] = {}
        for result in group:
            for h in result["history"]:
                curve.setdefault(h["step"], []).append((h["id_val_acc"], h["test_acc"]))
        means = {s: statistics.fmean(v for v, _ in pts) for s, pts in sorted(curve.items())}
        best = max(means.values())
        plateau = min(s for s, v in means.items() if v >= best - args.plateau / 100)
        for step, pts in sorted(curve.items()):
            rows.append(
                {
                    "lr": lr,
                    "step": step,
                    "id_val_acc": means[step],
                    "test_acc": statistics.fmean(t for _, t in pts),
                    "plateau_step": plateau,
                    "lp_id_val_acc": lp_metrics["id_val_acc"],
                    "lp_test_acc": lp_metrics["test_acc"],
                }
            )
    print(
        f"LP (frozen shipped foundation): ID-val {100 * lp_metrics['id_val_acc']:.1f}, "
        f"test {100 * lp_metrics['test_acc']:.1f}"
    )
    steps = sorted({r["step"] for r in rows})
    table = []
    for step in steps:
        line: dict[str, Any] = {"step": step}
        for r in rows:
            if r["step"] == step:
                line[f"{r['lr']:g}"] = f"{100 * r['id_val_acc']:.1f} ({100 * r['test_acc']:.1f})"
        table.append(line)
    table.append({"step": "plateau", **{f"{r['lr']:g}": str(r["plateau_step"]) for r in rows}})
    print(f"mean ID-val (test) of {args.runs} runs per lr, along training:")
    print(format_table(table, [("step", "")] + [(f"{lr:g}", "s") for lr in args.lrs]))
    print(f"rows: {write_rows(rows, args.out)}")
    return 0


def regimes_study(args: Any) -> int:
    cases = [
        replace(c, steps=args.target_steps) if args.target_steps else c
        for c in regime_cases()
        if c.factor in args.factors
    ]
    lps = {}
    for c in cases:
        lps.setdefault(lp_spec(c, args.workdir).out, lp_spec(c, args.workdir, args.lp_steps))
    lp_metrics = dict(zip(lps, train_all(list(lps.values()), args.workers), strict=True))

    def group(case: Case, seed: int) -> list[RunSpec]:
        return run_specs(case, seed, args.n, args.workdir, args.lp_steps)

    train_all([s for c in cases for seed in args.seeds for s in group(c, seed)], args.workers)
    rows = []
    for case in cases:
        lp = lp_metrics[lp_spec(case, args.workdir).out]
        for seed in args.seeds:
            paths = [s.out for s in group(case, seed)]
            soups = group_soups(paths)
            row: dict[str, Any] = {
                "factor": case.factor,
                "label": case.label,
                "dataset": case.dataset,
                "test_env": case.test_env,
                "lr": case.lr,
                "foundation": case.foundation,
                "foundation_val_acc": foundation_acc(case.foundation, args.workdir),
                "trial_seed": seed,
                "n_runs": args.n,
                "lp_id_val_acc": lp["id_val_acc"],
                "lp_test_acc": lp["test_acc"],
                **soup_columns(soups),
            }
            rows.append(row)
            print(f"{case.factor} {case.label} seed {seed}: " + ", ".join(
                f"{m} {100 * soups[m][1]:.1f}" for m in METHODS), file=sys.stderr)  # fmt: skip
    print(format_table(summary(rows), SUMMARY_COLUMNS))
    print(f"rows: {write_rows(rows, args.out)}")
    if args.plot:
        print(f"plot: {plot_gains(rows, args.plot)}")
    return 0


def by_lr_study(args: Any) -> int:
    """Soups of a finished sweep's groups split by learning rate (no training)."""
    from raysoup.results import load_results

    trials = load_results(args.sweep)["trials"]
    trials = trials[(trials["stage"] == "target") & (trials["status"] == "done")]
    rows = []
    for (init, seed), group in trials.groupby(["init", "trial_seed"], sort=True):
        splits = [("all", group), *((f"{lr:g}", g) for lr, g in group.groupby("lr", sort=True))]
        for label, runs in splits:
            if len(runs) < 2:
                continue
            soups = group_soups([Path(p) for p in sorted(runs["checkpoint"])])
            row: dict[str, Any] = {
                "factor": f"lr ({init})",
                "label": label,
                "init": init,
                "trial_seed": int(seed),
                "n_runs": len(runs),
                "lp_id_val_acc": math.nan,
                "lp_test_acc": math.nan,
                **soup_columns(soups),
            }
            rows.append(row)
    print(format_table(summary(rows), SUMMARY_COLUMNS))
    print(f"rows: {write_rows(rows, args.out)}")
    return 0


SUMMARY_COLUMNS = [
    ("factor", "s"), ("case", "s"), ("LP id/test", "s"), ("runs id/test", "s"),
    ("erm test", "s"), ("uniform - erm", "s"), ("greedy - erm", "s"), ("ensemble - erm", "s"),
    ("greedy n", ".1f"), ("uniform id", "s"), ("greedy id", "s"), ("erm id", "s"),
]  # fmt: skip


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per case: mean ± SE over seeds; gains are paired per seed."""
    out = []
    for key in dict.fromkeys((r["factor"], r["label"]) for r in rows):
        group = [r for r in rows if (r["factor"], r["label"]) == key]

        def ms(column: str, group: list[dict[str, Any]] = group) -> str:
            return fmt(mean_se([r[column] for r in group]))

        def gain(method: str, group: list[dict[str, Any]] = group) -> str:
            return fmt(mean_se([r[f"{method}_test_acc"] - r["erm_test_acc"] for r in group]))

        out.append(
            {
                "factor": key[0],
                "case": key[1],
                "LP id/test": "-"
                if math.isnan(group[0]["lp_id_val_acc"])
                else f"{100 * group[0]['lp_id_val_acc']:.1f} / {100 * group[0]['lp_test_acc']:.1f}",
                "runs id/test": f"{mean_se([r['runs_id_val_mean'] for r in group])[0]:.1f} / "
                f"{mean_se([r['runs_test_mean'] for r in group])[0]:.1f}",
                "erm test": ms("erm_test_acc"),
                "uniform - erm": gain("uniform"),
                "greedy - erm": gain("greedy"),
                "ensemble - erm": gain("ensemble"),
                "greedy n": statistics.fmean(r["greedy_n"] for r in group),
                "uniform id": ms("uniform_id_val_acc"),
                "greedy id": ms("greedy_id_val_acc"),
                "erm id": ms("erm_id_val_acc"),
            }
        )
    return out


def plot_gains(rows: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """One panel per factor: test-accuracy gain over ERM (mean ± SE) of each method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    factors = [f for f in dict.fromkeys(r["factor"] for r in rows) if f != "default"]
    factors = factors or ["default"]
    figure = Figure(figsize=(4.2 * len(factors), 3.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(factors), sharey=True, squeeze=False)[0]
    default = [r for r in rows if r["factor"] == "default"]
    for ax, factor in zip(axes, factors, strict=True):
        labels = [f"default ({'registry' if factor == 'lr' else 'shipped, env 2'})"]
        groups = [default]
        for label in dict.fromkeys(
            r["label"] for r in rows if r["factor"] == factor and factor != "default"
        ):
            labels.append(label)
            groups.append([r for r in rows if (r["factor"], r["label"]) == (factor, label)])
        for offset, method in ((-0.2, "uniform"), (0.0, "greedy"), (0.2, "ensemble")):
            gains = [[r[f"{method}_test_acc"] - r["erm_test_acc"] for r in g] for g in groups]
            stats = [mean_se(g) for g in gains]
            ax.errorbar(
                [i + offset for i in range(len(groups))],
                [s[0] for s in stats],
                yerr=[s[1] for s in stats],
                fmt="o",
                capsize=3,
                label=method,
            )
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(groups)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(factor)
    axes[0].set_ylabel("test acc. − ERM's (points)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "soup_regimes.png"
    figure.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("study", choices=("steps", "regimes", "by-lr"))
    parser.add_argument("--sweep", type=Path, default=None, help="by-lr: a finished sweep")
    parser.add_argument("--workdir", type=Path, help="steps, regimes: runs are kept (reused) here")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=None, help="Parquet rows")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--runs", type=int, default=2, help="steps study: runs per lr")
    parser.add_argument("--steps", type=int, default=900, help="steps study: run length")
    parser.add_argument("--plateau", type=float, default=0.5, help="points below the best")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=4, help="regimes: runs per group")
    parser.add_argument(
        "--factors",
        nargs="+",
        default=["default", "lr", "foundation", "shift"],
        choices=["default", "lr", "foundation", "shift"],
        help="regimes: which cases to run",
    )
    parser.add_argument("--lp-steps", type=int, default=None, help="default: the dataset's")
    parser.add_argument(
        "--target-steps", type=int, default=None, help="regimes: every case's run length"
    )
    parser.add_argument("--plot", type=Path, default=None, help="folder for soup_regimes.png")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS_DIR / f"soup_{args.study.replace('-', '_')}.parquet"
    if args.study == "by-lr" and args.sweep is None:
        parser.error("by-lr needs --sweep PATH (a finished sweep's folder)")
    if args.study != "by-lr" and args.workdir is None:
        parser.error(f"{args.study} needs --workdir PATH (where its runs are kept)")
    studies = {"steps": steps_study, "regimes": regimes_study, "by-lr": by_lr_study}
    return studies[args.study](args)


if __name__ == "__main__":
    sys.exit(main())
