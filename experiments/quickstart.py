"""Run a sweep (the built-in quickstart, or a YAML config) on a local or running Ray cluster.

Locally:        python experiments/quickstart.py --storage runs
On a cluster:   ray submit cluster.yaml experiments/quickstart.py -- --address auto \
                    --storage s3://my-bucket/runs      (or a shared mount: /mnt/shared/runs)
  or            ray job submit -- python experiments/quickstart.py --storage s3://my-bucket/runs
                (the job's RAY_ADDRESS attaches it to the cluster)
Same command again: resumes the interrupted sweep.
"""

from __future__ import annotations

import argparse
import sys

from raysoup.options import OptionsError
from raysoup.results import load_results, sweep_table
from raysoup.sweep.cluster import connect
from raysoup.sweep.config import load_config
from raysoup.sweep.script_options import run_sweep_for_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None, help="sweep config YAML")
    parser.add_argument(
        "--storage", default="runs", help="shared path every node sees, or s3://bucket/runs"
    )
    parser.add_argument("--name", default=None, help="experiment name")
    parser.add_argument(
        "--address",
        default=None,
        help="'auto' to attach to the running cluster (ray submit); default: $RAY_ADDRESS "
        "(set by ray job submit), else a new local Ray instance",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, name=args.name)  # validated before Ray starts
    except OptionsError as error:
        parser.error(str(error))  # exit code 2
    connect(args.address)
    root, code = run_sweep_for_script(parser, config, args.storage)  # 3: runs failed
    print(sweep_table(load_results(root), dataset=config.dataset))
    return code


if __name__ == "__main__":
    sys.exit(main())
