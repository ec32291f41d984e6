"""The ``raysoup`` command: thin front-ends over the package's functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raysoup.contract import ACCEPT, METHODS, TABLE_FORMATS
from raysoup.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, RaysoupError
from raysoup.options import add_arguments, from_mapping

__all__ = ["build_parser", "main"]


def _train(args: argparse.Namespace) -> int:
    from raysoup.training.trainer import RunSpec, result_json, train_run

    values = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    spec = from_mapping(RunSpec, values, "raysoup train")
    spec.validate()

    def progress(metrics: dict) -> None:
        print(
            f"step {metrics['step']:>6}  loss {metrics['loss']:.4f}  "
            f"id_val {metrics['id_val_acc']:.4f}  test {metrics['test_acc']:.4f}  "
            f"{metrics['wall_s']:.1f}s",
            file=sys.stderr,
        )

    result = train_run(spec, on_eval=progress)
    print(result_json(result))
    return 0


def _config_name(path: str | None, name: str | None) -> str | None:
    """The sweep name ``raysoup run`` will use, read cheaply (YAML only); ``None`` when
    only the full config load can tell (it reports any problem)."""
    from raysoup.sweep import QUICKSTART_NAME

    if name or path is None:
        return name or QUICKSTART_NAME
    try:
        import yaml

        with open(path) as handle:
            data = yaml.safe_load(handle)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    found = data.get("name", QUICKSTART_NAME) if isinstance(data, dict) else None
    return found if isinstance(found, str) and found else None


def _run(args: argparse.Namespace) -> int:
    from raysoup.io.layout import SweepLayout
    from raysoup.sweep.lease import SweepLease

    name = _config_name(args.config, args.name)
    if name is not None:
        # A second driver is told at once, before the imports of torch and Ray below.
        try:
            SweepLease(SweepLayout.of(args.storage, name).root).check()
        except OSError:
            pass  # an unusable storage: run_sweep's check says what is wrong with it

    from raysoup.results import load_results, sweep_table
    from raysoup.sweep.config import load_config
    from raysoup.sweep.runner import run_sweep_status

    config = load_config(args.config, name=args.name)  # validated before Ray starts
    root, code = run_sweep_status(config, args.storage)  # code 3: some runs failed
    print(sweep_table(load_results(root), dataset=config.dataset))
    print(f"results: {SweepLayout(root).results}")
    return code


def _results(args: argparse.Namespace) -> int:
    from raysoup.results import load_results, sweep_table

    results = load_results(args.path)
    print(sweep_table(results, dataset=args.dataset, fmt=args.format))
    if args.plot is not None:
        _save_figures(results, args.plot, args.dataset)
    return 0


def _save_figures(results: dict, folder: str, dataset: str | None) -> None:
    from pathlib import Path

    from raysoup.results.plots import results_figures, save_figure

    Path(folder).mkdir(parents=True, exist_ok=True)
    figures = results_figures(results, dataset=dataset)
    for stem, figure in figures.items():
        save_figure(figure, Path(folder) / stem)
    print(f"plots: {len(figures)} figures (.png and .svg) in {folder}", file=sys.stderr)


def _diagnose(args: argparse.Namespace) -> int:
    from raysoup.diagnostics.diagnose import DiagnoseOptions, diagnose
    from raysoup.results import load_results

    values = {k: v for k, v in vars(args).items() if k in _fields(DiagnoseOptions)}
    options = from_mapping(DiagnoseOptions, values, "raysoup diagnose")
    options.validate()  # before anything is read
    rows = diagnose(args.path, options)
    print(f"diagnostics: {len(rows)} rows", file=sys.stderr)
    if args.plot is not None:
        _save_figures(load_results(args.path), args.plot, None)
    return 0


def _write_report(args: argparse.Namespace) -> int:
    from raysoup.results.report import write_report

    print(f"report: {write_report(args.path, args.output, dataset=args.dataset)}")
    return 0


def _fields(cls: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def _soup(args: argparse.Namespace) -> int:
    from raysoup.results import load_results, sweep_table
    from raysoup.soup.maker import describe
    from raysoup.soup.posthoc import resoup

    methods = METHODS if args.method == "all" else ("erm", args.method)
    rows = resoup(args.path, methods=methods, accept=args.accept, device=args.device)
    for row in rows:
        print(describe(row), file=sys.stderr)
    print(sweep_table(load_results(args.path)))
    return 0


def _import_options(args: argparse.Namespace) -> dict:
    return {
        "arch": args.arch,
        "dataset": args.dataset,
        "undeclared": getattr(args, "undeclared", False),
        "source_format": args.source_format,
        "image_size": args.image_size,
    }


def _import_featurizer(args: argparse.Namespace) -> int:
    from raysoup.models.foreign import import_featurizer

    if args.dataset is None:  # what a pretrained init saw is the user's to know, not a guard's
        args.undeclared = True
    done = import_featurizer(args.source, args.out, **_import_options(args))
    meta = done.meta
    print(
        f"featurizer {meta.arch} ({meta.init['source_format']}, {meta.content_hash[:12]}...) "
        f"-> {done.checkpoint}; use it with `pretrained_weights: {done.checkpoint}`"
    )
    return 0


def _pool_add(args: argparse.Namespace) -> int:
    from raysoup.models.foreign import pool_add

    done = pool_add(args.pool, args.source, **_import_options(args))
    state = "added" if done.added else "already in the pool"
    declared = "undeclared data" if not done.meta.init["declared"] else done.meta.dataset
    print(f"{state}: {done.checkpoint} ({done.meta.arch}, trained on {declared})")
    return 0


def _fetch_weights(args: argparse.Namespace) -> int:
    from raysoup.models.weights import fetch_weights

    print(f"weights: {fetch_weights(args.arch, args.folder)}")
    return 0


def _add_models(commands: argparse._SubParsersAction) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--arch",
            default=None,
            help="resnet18, resnet50, cnn, glyphcnn or timm:<name> (default: the timm "
            "architecture the source's config.json names)",
        )
        parser.add_argument(
            "--format",
            dest="source_format",
            default=None,
            choices=["raysoup", "torchvision", "timm", "hf-resnet", "hf-vit"],
            help="how to read the source's key names (default: recognised from them)",
        )
        parser.add_argument(
            "--image-size", type=int, default=None, help="input size (ViTs: resamples pos_embed)"
        )

    imp = commands.add_parser(
        "import-featurizer",
        help="convert a timm / torchvision / Hugging Face checkpoint to a raysoup featurizer",
        description="Read SRC (a weights file, a save_pretrained folder or a Hugging Face "
        "cache entry; never unpickled), map its keys to ARCH's featurizer, check every shape "
        "and write a raysoup checkpoint to OUT.",
    )
    imp.add_argument("source", metavar="SRC")
    imp.add_argument("--out", required=True, help="the raysoup checkpoint folder to write")
    imp.add_argument("--dataset", default=None, help="what SRC was trained on, if known")
    common(imp)
    imp.set_defaults(handler=_import_featurizer)

    pool = commands.add_parser("pool", help="auxiliary pools of foreign fine-tunings")
    actions = pool.add_subparsers(dest="pool_command", required=True)
    add = actions.add_parser(
        "add",
        help="register someone else's fine-tuning in a pool folder (use it with aux_dirs)",
        description="Convert SRC's featurizer (as import-featurizer) into POOL/<dataset>-<hash>, "
        "recording the dataset it was fine-tuned on for the leakage guard.",
    )
    add.add_argument("pool", metavar="POOL", help="the pool folder (created if missing)")
    add.add_argument("--from", dest="source", required=True, metavar="SRC")
    add.add_argument(
        "--dataset",
        default=None,
        help="the dataset SRC was fine-tuned on (required unless --undeclared)",
    )
    add.add_argument(
        "--undeclared",
        action="store_true",
        help="nobody knows what SRC was trained on: target sweeps refuse it unless "
        "allow_undeclared_aux, and mark the runs using it",
    )
    common(add)
    add.set_defaults(handler=_pool_add)

    fetch = commands.add_parser(
        "fetch-weights",
        help="download a timm model's pretrained weights once into FOLDER (needs internet)",
    )
    fetch.add_argument("arch", help="timm:<name>")
    fetch.add_argument("folder", help="e.g. shared storage; then pretrained_weights: FOLDER")
    fetch.set_defaults(handler=_fetch_weights)


def _add_train(commands: argparse._SubParsersAction) -> None:
    from raysoup.training.trainer import RunSpec

    train = commands.add_parser(
        "train",
        help="train one run without Ray; prints one JSON object with its accuracies",
        description="Train one run (base, LP, auxiliary or target) and write its checkpoint.",
    )
    add_arguments(train, RunSpec)
    train.set_defaults(handler=_train)


def build_parser(with_train: bool = True) -> argparse.ArgumentParser:
    """The ``raysoup`` parser. ``train``'s options come from ``RunSpec``, whose module
    imports torch: ``raysoup run`` leaves them out, so that a second driver on a held
    sweep is refused within a second or two, not after the torch and Ray imports."""
    parser = argparse.ArgumentParser(prog="raysoup", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    if with_train:
        _add_train(commands)
    run = commands.add_parser(
        "run",
        help="run (or resume) a whole sweep on Ray: base, LP, auxiliary pool, target sweep",
        description="Run every stage of a sweep; the same command resumes an interrupted one. "
        "With no CONFIG, the built-in quickstart runs locally, offline, on CPU.",
    )
    run.add_argument("config", nargs="?", default=None, help="sweep config YAML")
    run.add_argument(
        "--storage",
        default="runs",
        help="local path (default: ./runs) or pyarrow URI, e.g. s3://bucket/runs",
    )
    run.add_argument("--name", default=None, help="experiment name (default: the config's)")
    run.set_defaults(handler=_run)

    results = commands.add_parser("results", help="print the paper-style table of a sweep")
    results.add_argument("path", help="<storage>/<name> or its results/ folder")
    results.add_argument("--dataset", default=None, help="when several datasets are present")
    results.add_argument("--format", default="text", choices=TABLE_FORMATS)
    results.add_argument(
        "--plot",
        default=None,
        metavar="DIR",
        help="also draw every figure (methods, id_vs_ood, soup_progress and, after "
        "`raysoup diagnose`, the diagnostics) as PNG and SVG",
    )
    results.set_defaults(handler=_results)

    if with_train:  # DiagnoseOptions' module imports torch, as RunSpec's does
        from raysoup.diagnostics.diagnose import DiagnoseOptions

        diagnose = commands.add_parser(
            "diagnose",
            help="why the soups work: interpolation curves, angles, landscape (Parquet)",
            description="Evaluate straight lines and planes in weight space between a "
            "sweep's inits, trials and soups (ID-val and test accuracy and loss) and write "
            "them to results/diagnostics/. Reruns skip what is unchanged.",
        )
        diagnose.add_argument("path", help="the sweep folder <storage>/<name>")
        add_arguments(diagnose, DiagnoseOptions)
        diagnose.add_argument(
            "--plot", default=None, metavar="DIR", help="then draw every figure into DIR"
        )
        diagnose.set_defaults(handler=_diagnose)

    report = commands.add_parser(
        "report",
        help="write one self-contained HTML report (tables and figures) of a sweep",
    )
    report.add_argument("path", help="<storage>/<name> (local path or URI)")
    report.add_argument("-o", "--output", default="report.html", help="the HTML file")
    report.add_argument("--dataset", default=None, help="when several datasets are present")
    report.set_defaults(handler=_write_report)

    soup = commands.add_parser(
        "soup",
        help="recompute a sweep's soups from its trial checkpoints (no retraining)",
        description="Post-hoc soups: rebuild the erm/uniform/greedy/uniform_all/ensemble rows "
        "of a finished (or partial) sweep from its target trial checkpoints, replacing its "
        "soups rows.",
    )
    soup.add_argument("path", help="the sweep folder <storage>/<name>")
    soup.add_argument(
        "--method",
        default="all",
        choices=["all", *(m for m in METHODS if m != "erm")],
        help="which soups to recompute (erm always comes along); default: all",
    )
    soup.add_argument(
        "--accept", default=None, choices=ACCEPT, help="default: the sweep's soup_accept"
    )
    soup.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    soup.set_defaults(handler=_soup)
    _add_models(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes by meaning (the table in ``raysoup.errors`` and the README)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_train=argv[:1] != ["run"])
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except RaysoupError as error:
        return _report(args.command, error.label, error, error.exit_code)
    except FileNotFoundError as error:  # a path given that does not exist
        return _report(args.command, "error", error, EXIT_BAD_INPUT)
    except OSError as error:  # a disk, a network, a cluster address
        return _report(args.command, "environment", error, EXIT_ENVIRONMENT)
    except ValueError as error:  # the pure functions' checks of what the user gave
        return _report(args.command, "error", error, EXIT_BAD_INPUT)


def _report(command: str, label: str, error: BaseException, code: int) -> int:
    print(f"raysoup {command}: {label}: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
