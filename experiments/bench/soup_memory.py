"""Peak memory of the soup process as the number of trials grows: raysoup vs post hoc.

Each measurement runs in a fresh process and reports its peak resident memory
(``ru_maxrss``) while it soups N ResNet-18 trials (43 MB each in fp32) of one group and
writes the erm / uniform / greedy soups, with the same ID-val scorer every way:

- ``raysoup``: the ``SoupMaker`` the soup actor runs (running fp32 mean, at most
  ``--max-models`` cached checkpoints): should cost the same whatever N;
- ``posthoc-all``: the reference post-hoc style that first loads every candidate
  (model soups' ``learned_bylayer.py``: ``sds = [torch.load(cp, map_location='cpu') for cp
  in model_paths]``), then sorts and runs Recipe 1 with model soups' per-key averaging
  (``main.py``) over the in-memory dict: N models;
- ``sequential``: model soups' ``main.py`` greedy soup as written, one checkpoint loaded at
  a time (the soup, the candidate and the potential soup in memory).

Candidates are offered best first by default (``--order ranked``: batch Recipe 1, N-1
greedy evaluations every way); ``--order arrival`` offers them in creation order (random
accuracies), the streaming actor's case, with re-decisions (more evaluations and loads).

    python experiments/bench/soup_memory.py
    python experiments/bench/soup_memory.py --n 10 25 --modes raysoup --order arrival

With ``--device cuda`` the soups are evaluated on the GPU (``SoupMaker(device=...)``; the
reference modes load on the CPU, as ``map_location='cpu'`` does, and evaluate there) and
``gpu_peak_mb`` reports torch's peak GPU allocation; ``peak_mb`` stays host memory.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATASET = "MiniRotatedMNIST"


def make_candidates(root: Path, n: int, seed: int = 0, arch: str = "resnet18") -> list[Path]:
    """``n`` 'trials' of one group: one random network plus small seeded noise (``arch``:
    ResNet-18 by default; ``cnn``, the built-in small network, for smoke tests)."""
    import torch

    from raysoup.data.registry import dataset_class
    from raysoup.io.checkpoint import CheckpointMeta, is_checkpoint, save_checkpoint
    from raysoup.models.networks import build_network

    cls = dataset_class(DATASET)
    torch.manual_seed(seed)
    base = build_network(arch, cls.NUM_CLASSES, input_channels=cls.INPUT_SHAPE[0])
    state = base.state_dict()
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = root / (f"target-h{i}" if arch == "resnet18" else f"target-{arch}-h{i}")
        paths.append(path)
        # Below chance (0.1) on purpose: soups of these random networks score about chance,
        # so most candidates are accepted and the soup (and its running sum) keeps growing.
        accuracy = round(rng.uniform(0.0, 0.09), 3)
        if is_checkpoint(path):
            continue
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        noisy = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in state.items()
        }
        meta = CheckpointMeta(
            dataset=DATASET,
            envs=list(cls.ENVIRONMENTS),
            arch=arch,
            num_classes=cls.NUM_CLASSES,
            stage="target",
            test_env=5,
            hparams_seed=i,
            init={"strategy": "pretrained"},
            metrics={"id_val_acc": accuracy, "test_acc": accuracy},
        )
        save_checkpoint(path, noisy, meta)
    return paths


def _gpu_peak_mb(device: str) -> float | None:
    """Peak GPU memory allocated by torch (MB) on a CUDA device, else None."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def soup_peak(
    candidates: list[Path], out: Path, max_models: int, device: str = "cpu"
) -> dict[str, float]:
    """Soup ``candidates`` with a ``SoupMaker`` (evaluating on ``device``); call in a fresh
    process."""
    import resource

    import torch

    from raysoup.soup.group import Offer
    from raysoup.soup.maker import SoupMaker

    torch.set_num_threads(1)
    started = time.time()
    offers = [Offer.from_checkpoint(p.name, p) for p in candidates]
    maker = SoupMaker(
        out, "memory", device=device, max_models=max_models, persist=False, log=lambda _: None
    )
    maker.offer(offers)
    rows = maker.finalize_all()
    group = next(iter(maker.groups.values()))
    return {
        "n": len(candidates),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "evaluations": maker.n_scorings,
        "loads": group.states.n_loads,
        "greedy_size": next(r["n_ingredients"] for r in rows if r["method"] == "greedy"),
        "wall_s": time.time() - started,
        "gpu_peak_mb": _gpu_peak_mb(device),
    }


def _reference_setup(
    candidates: list[Path], device: str = "cpu"
) -> tuple[Any, list[tuple[Path, float]]]:
    """The scorer raysoup uses (same data, same network) and the candidates, best first."""
    import torch

    from raysoup.io.checkpoint import read_meta
    from raysoup.soup.evaluator import DataKey, GroupData, SoupEvaluator

    torch.set_num_threads(1)
    metas = [read_meta(p) for p in candidates]
    key = DataKey.of(metas[0])
    evaluator = SoupEvaluator(GroupData(key, None, 0.2), metas[0], torch.device(device))
    scored = [(p, float(m.metrics["id_val_acc"])) for p, m in zip(candidates, metas, strict=True)]
    # sorted(..., reverse=True) by accuracy, as model soups / DiWA sort; ties by name
    scored.sort(key=lambda item: (-item[1], item[0].name))
    return evaluator, scored


def _greedy_step(soup: dict, new: dict, n: int) -> dict:
    """model soups ``main.py``: the potential greedy soup of ``n`` ingredients plus one."""
    return {k: soup[k].clone() * (n / (n + 1.0)) + new[k].clone() * (1.0 / (n + 1)) for k in new}


def _uniform_step(soup: dict | None, new: dict, num_models: int) -> dict:
    """model soups ``main.py``: the uniform soup, one model added."""
    if soup is None:
        return {k: v * (1.0 / num_models) for k, v in new.items()}
    return {k: v * (1.0 / num_models) + soup[k] for k, v in new.items()}


def reference_peak(
    candidates: list[Path], out: Path, hold_all: bool, device: str = "cpu"
) -> dict[str, float]:
    """Post-hoc Recipe 1 the reference way (``>=``); call in a fresh process.

    ``hold_all``: load every candidate first (``posthoc-all``), else one at a time
    (``sequential``, model soups' ``main.py``). Checkpoints are loaded on the CPU
    (``map_location='cpu'``), the soup evaluated on ``device``. Writes nothing under ``out``.
    """
    import resource

    from raysoup.io.checkpoint import load_checkpoint

    started = time.time()
    evaluator, ranked = _reference_setup(candidates, device)
    loads = 0

    def load(path: Path) -> dict:
        nonlocal loads
        loads += 1
        return load_checkpoint(path)[0]

    held = {p: load(p) for p, _ in ranked} if hold_all else {}

    def get(path: Path) -> dict:
        return held[path] if hold_all else load(path)

    evaluations = 0
    soup, best = get(ranked[0][0]), ranked[0][1]
    size = 1
    for path, _ in ranked[1:]:
        potential = _greedy_step(soup, get(path), size)
        accuracy = evaluator.id_val_acc(potential)
        evaluations += 1
        if accuracy >= best:
            soup, best, size = potential, accuracy, size + 1
    evaluator.test_acc(soup)
    uniform = None
    for path, _ in ranked:
        uniform = _uniform_step(uniform, get(path), len(ranked))
    evaluator.id_val_acc(uniform)
    evaluations += 1
    evaluator.test_acc(uniform)
    return {
        "n": len(candidates),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "evaluations": evaluations,
        "loads": loads,
        "greedy_size": size,
        "wall_s": time.time() - started,
        "gpu_peak_mb": _gpu_peak_mb(device),
    }


MODES = ("raysoup", "posthoc-all", "sequential")


def run_mode(
    mode: str, candidates: list[Path], out: Path, max_models: int, device: str = "cpu"
) -> dict[str, float]:
    """One measurement of ``mode``; call in a fresh process (``measure`` does)."""
    if mode == "raysoup":
        return soup_peak(candidates, out, max_models, device)
    if mode in ("posthoc-all", "sequential"):
        return reference_peak(candidates, out, mode == "posthoc-all", device)
    raise ValueError(f"mode {mode!r}: expected one of {MODES}")


def measure(
    candidates: list[Path],
    out: Path,
    max_models: int = 2,
    mode: str = "raysoup",
    device: str = "cpu",
) -> dict[str, float]:
    """``run_mode`` in a fresh Python process (so earlier work does not count)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from soup_memory import run_mode; "
        "print(json.dumps(run_mode(sys.argv[5], [Path(p) for p in json.loads(sys.argv[2])], "
        "Path(sys.argv[3]), int(sys.argv[4]), sys.argv[6])))"
    )
    args = [str(Path(__file__).parent), json.dumps([str(p) for p in candidates]), str(out)]
    done = subprocess.run(
        [sys.executable, "-c", code, *args, str(max_models), mode, device],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ranked_order(candidates: list[Path]) -> list[Path]:
    """Best ID-val first (ties by name): the order batch Recipe 1 visits them."""
    from raysoup.io.checkpoint import read_meta

    accuracy = {p: float(read_meta(p).metrics["id_val_acc"]) for p in candidates}
    return sorted(candidates, key=lambda p: (-accuracy[p], p.name))


def main(argv: list[str] | None = None) -> int:
    # Imported here: tests load this module by path for make_candidates / measure alone.
    from benchlib import (
        add_common_arguments,
        device_from_args,
        format_table,
        machine,
        script_parser,
        write_rows,
    )

    parser = script_parser(__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 50, 100], help="trials")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--order", choices=("ranked", "arrival"), default="ranked")
    parser.add_argument("--arch", choices=("resnet18", "resnet50", "cnn"), default="resnet18")
    parser.add_argument("--max-models", type=int, default=2, help="raysoup's model cache")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the candidates")
    add_common_arguments(parser, "soup_memory")
    args = parser.parse_args(argv)
    if min(args.n) < 2 or args.max_models < 0:
        parser.error("--n values must be >= 2 and --max-models >= 0")
    device = device_from_args(parser, args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        candidates = make_candidates(root / "trials", max(args.n), arch=args.arch)
        model_mb = candidates[0].joinpath("model.safetensors").stat().st_size / 2**20
        print(
            f"one {args.arch} model: {model_mb:.1f} MB; max_models={args.max_models}; "
            f"order={args.order}"
        )
        for n in sorted(args.n):
            chosen = candidates[:n]
            if args.order == "ranked":
                chosen = ranked_order(chosen)
            for mode in args.modes:
                r = measure(chosen, root / f"out-{mode}-{n}", args.max_models, mode, str(device))
                rows.append(
                    {
                        "script": "soup_memory",
                        "mode": mode,
                        "order": args.order,
                        "arch": args.arch,
                        "max_models": args.max_models,
                        "model_mb": model_mb,
                        "all_models_mb": n * model_mb,
                        **r,
                    }
                )
    for row in rows:
        same_n = {r["mode"]: r["peak_mb"] for r in rows if r["n"] == row["n"]}
        row["x_raysoup"] = row["peak_mb"] / same_n["raysoup"] if "raysoup" in same_n else None
    info = machine(device)
    rows = [row | info for row in rows]
    columns = [
        ("n", "d"),
        ("mode", ""),
        ("peak_mb", ".0f"),
        ("all_models_mb", ".0f"),
        ("x_raysoup", ".2f"),
        ("evaluations", "d"),
        ("loads", "d"),
        ("greedy_size", "d"),
        ("wall_s", ".1f"),
        ("gpu_peak_mb", ".0f"),
    ]
    print(format_table(rows, columns))
    print(f"rows: {write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
