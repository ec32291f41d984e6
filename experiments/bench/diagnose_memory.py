"""Peak memory of ``raysoup diagnose`` on one group as the group grows.

Each measurement runs in a fresh process and reports its peak resident memory
(``ru_maxrss``) while it diagnoses N trials of one group (the soup memory benchmark's
candidates: one random ResNet-18, 43 MB in fp32, plus seeded noise per trial; every trial's
init is that network) with its uniform soup: every part (init -> each trial, the pairs of the
``--pair-trials`` best, soup -> each ingredient, angles and, with ``--landscape``, the
plane), evaluated on MiniRotatedMNIST's ID-val and test data. ``all_models_mb`` is what
holding the group's trials at once would take; raysoup's peak should not grow with N.

    python experiments/bench/diagnose_memory.py
    python experiments/bench/diagnose_memory.py --n 4 16 --points 5 --landscape
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from soup_memory import DATASET, _gpu_peak_mb, make_candidates


def make_soup(candidates: list[Path], out: Path) -> Path:
    """The uniform soup checkpoint of ``candidates`` (the group's soup to diagnose)."""
    from raysoup.io.checkpoint import is_checkpoint, read_meta, save_checkpoint
    from raysoup.io.checkpoint import load_checkpoint as load
    from raysoup.soup.average import uniform_average
    from raysoup.soup.group import GroupKey, soup_meta

    if not is_checkpoint(out):
        like = read_meta(candidates[0])
        state = uniform_average(load(p)[0] for p in candidates)
        key = GroupKey(like.dataset, like.test_env, like.trial_seed, "pretrained")
        names = [p.name for p in candidates]
        save_checkpoint(out, state, soup_meta(key, "uniform", like, names, {}))
    return out


def diagnose_peak(
    candidates: list[Path], soup: Path, options: dict[str, Any], arch: str
) -> dict[str, Any]:
    """Diagnose ``candidates`` (and ``soup``) in this process; call in a fresh one."""
    import resource

    import torch

    from raysoup.data.registry import dataset_class
    from raysoup.diagnostics.diagnose import (
        DiagnoseOptions,
        GroupInputs,
        SoupInput,
        TrialInput,
        diagnose_group,
    )
    from raysoup.io.checkpoint import read_meta
    from raysoup.models.networks import build_network
    from raysoup.soup.evaluator import DataKey, GroupData
    from raysoup.soup.greedy import rank_key
    from raysoup.soup.group import Offer

    torch.set_num_threads(1)
    started = time.time()
    cls = dataset_class(DATASET)

    def init() -> dict[str, torch.Tensor]:  # make_candidates' base network, rebuilt
        torch.manual_seed(0)
        network = build_network(arch, cls.NUM_CLASSES, input_channels=cls.INPUT_SHAPE[0])
        return network.state_dict()

    offers = sorted(
        (Offer.from_checkpoint(p.name, p) for p in candidates),
        key=lambda o: rank_key(o.candidate),
    )
    meta = read_meta(candidates[0])
    key = offers[0].group
    inputs = GroupInputs(
        key,
        [TrialInput(o, init) for o in offers],
        [
            SoupInput(
                "uniform",
                str(soup),
                read_meta(soup).content_hash,
                tuple(o.trial_id for o in offers),
            )
        ],
        data=lambda: GroupData(DataKey.of(meta), None, 0.2),
        sweep="memory",
    )
    rows: list[dict[str, Any]] = []
    diagnose_group(
        inputs,
        DiagnoseOptions(**options),
        lambda name, part: rows.extend(part),
        done={},
    )
    return {
        "n": len(candidates),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": len(rows),
        "wall_s": time.time() - started,
        "gpu_peak_mb": _gpu_peak_mb(options["device"]),
    }


def measure(
    candidates: list[Path], soup: Path, options: dict[str, Any], arch: str
) -> dict[str, Any]:
    """``diagnose_peak`` in a fresh Python process (so earlier work does not count)."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from diagnose_memory import diagnose_peak; "
        "print(json.dumps(diagnose_peak([Path(p) for p in json.loads(sys.argv[2])], "
        "Path(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5])))"
    )
    args = [
        str(Path(__file__).parent),
        json.dumps([str(p) for p in candidates]),
        str(soup),
        json.dumps(options),
        arch,
    ]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"diagnose measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from benchlib import (
        add_common_arguments,
        device_from_args,
        format_table,
        machine,
        script_parser,
        write_rows,
    )

    parser = script_parser(__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8, 16], help="trials")
    parser.add_argument("--arch", choices=("resnet18", "resnet50", "cnn"), default="resnet18")
    parser.add_argument("--points", type=int, default=3, help="points per segment")
    parser.add_argument("--pair-trials", type=int, default=4)
    parser.add_argument("--landscape", action="store_true")
    parser.add_argument("--grid", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the candidates")
    add_common_arguments(parser, "diagnose_memory")
    args = parser.parse_args(argv)
    if min(args.n) < 2:
        parser.error("--n values must be >= 2")
    device = device_from_args(parser, args.device)
    options = {
        "device": str(device),
        "points": args.points,
        "pair_trials": args.pair_trials,
        "landscape": args.landscape,
        "grid": args.grid,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        candidates = make_candidates(root / "trials", max(args.n), arch=args.arch)
        model_mb = candidates[0].joinpath("model.safetensors").stat().st_size / 2**20
        print(f"one {args.arch} model: {model_mb:.1f} MB; options {options}")
        for n in sorted(args.n):
            chosen = candidates[:n]
            soup = make_soup(chosen, root / f"soup-{n}")
            result = measure(chosen, soup, options, args.arch)
            rows.append(
                {
                    "script": "diagnose_memory",
                    "arch": args.arch,
                    "model_mb": model_mb,
                    "all_models_mb": n * model_mb,
                    **options,
                    **result,
                }
            )
    info = machine(device)
    rows = [row | info for row in rows]
    columns = [
        ("n", "d"),
        ("peak_mb", ".0f"),
        ("all_models_mb", ".0f"),
        ("rows", "d"),
        ("wall_s", ".1f"),
        ("gpu_peak_mb", ".0f"),
    ]
    print(format_table(rows, columns))
    print(f"rows: {write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
