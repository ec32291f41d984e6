"""The ``raysoup`` command: thin front-ends over the package's functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raysoup.options import OptionsError, add_arguments, from_mapping


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


def build_parser() -> argparse.ArgumentParser:
    from raysoup.training.trainer import RunSpec

    parser = argparse.ArgumentParser(prog="raysoup", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train one run without Ray; prints one JSON object with its accuracies",
        description="Train one run (base, LP, auxiliary or target) and write its checkpoint.",
    )
    add_arguments(train, RunSpec)
    train.set_defaults(handler=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (OptionsError, ValueError, FileNotFoundError) as error:
        print(f"raysoup {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
