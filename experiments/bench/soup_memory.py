"""Peak memory of the soup maker (what the soup actor runs) as the number of trials grows.

Each measurement runs in a fresh process and reports its peak resident memory
(``ru_maxrss``): the soup of N ResNet-18 trials (45 MB each in fp32) should cost the
same whatever N, not N models.

    python experiments/bench/soup_memory.py --n 10 25 50
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASET = "MiniRotatedMNIST"


def make_candidates(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` ResNet-18 'trials' of one group: one random network plus small seeded noise."""
    import torch

    from raysoup.data.registry import dataset_class
    from raysoup.io.checkpoint import CheckpointMeta, is_checkpoint, save_checkpoint
    from raysoup.models.networks import build_network

    cls = dataset_class(DATASET)
    torch.manual_seed(seed)
    base = build_network("resnet18", cls.NUM_CLASSES, input_channels=cls.INPUT_SHAPE[0])
    state = base.state_dict()
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = root / f"target-h{i}"
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
            arch="resnet18",
            num_classes=cls.NUM_CLASSES,
            stage="target",
            test_env=5,
            hparams_seed=i,
            init={"strategy": "pretrained"},
            metrics={"id_val_acc": accuracy, "test_acc": accuracy},
        )
        save_checkpoint(path, noisy, meta)
    return paths


def soup_peak(candidates: list[Path], out: Path, max_models: int) -> dict[str, float]:
    """Soup ``candidates`` with a ``SoupMaker``; call in a fresh process."""
    import resource

    import torch

    from raysoup.soup.group import Offer
    from raysoup.soup.maker import SoupMaker

    torch.set_num_threads(1)
    started = time.time()
    offers = [Offer.from_checkpoint(p.name, p) for p in candidates]
    maker = SoupMaker(
        out, "memory", device="cpu", max_models=max_models, persist=False, log=lambda _: None
    )
    maker.offer(offers)
    rows = maker.finalize_all()
    group = next(iter(maker.groups.values()))
    return {
        "n": len(candidates),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "evaluations": maker.n_evaluations,
        "loads": group.states.n_loads,
        "greedy_size": next(r["n_ingredients"] for r in rows if r["method"] == "greedy"),
        "wall_s": time.time() - started,
    }


def measure(candidates: list[Path], out: Path, max_models: int = 2) -> dict[str, float]:
    """``soup_peak`` in a fresh Python process (so earlier work does not count)."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from soup_memory import soup_peak; "
        "print(json.dumps(soup_peak([Path(p) for p in json.loads(sys.argv[2])], "
        "Path(sys.argv[3]), int(sys.argv[4]))))"
    )
    args = [str(Path(__file__).parent), json.dumps([str(p) for p in candidates]), str(out)]
    done = subprocess.run(
        [sys.executable, "-c", code, *args, str(max_models)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"soup_peak failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--max-models", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        candidates = make_candidates(root / "trials", max(args.n))
        model_mb = candidates[0].joinpath("model.safetensors").stat().st_size / 2**20
        print(f"one model: {model_mb:.1f} MB; max_models={args.max_models}")
        print(
            f"{'trials':>6}  {'peak MB':>8}  {'all models MB':>13}  {'evals':>5}  {'loads':>5}  "
            f"{'greedy':>6}  {'wall s':>6}"
        )
        for n in args.n:
            r = measure(candidates[:n], root / f"out-{n}", args.max_models)
            print(
                f"{n:>6}  {r['peak_mb']:>8.0f}  {n * model_mb:>13.0f}  {r['evaluations']:>5}  "
                f"{r['loads']:>5}  {r['greedy_size']:>6}  {r['wall_s']:>6.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
