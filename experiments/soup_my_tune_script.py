"""A plain Ray Tune fine-tuning sweep, souped while it runs. The raysoup lines are marked
``# raysoup``; everything else is the Tune script you already have.

The model is a torchvision ResNet-18 (``--arch timm:<name>`` for a timm model); every trial
fine-tunes the same init (a soup averages fine-tunings of one init). Offline and on CPU by
default: the data are scikit-learn's 8x8 digits, upsampled to 32x32; ID validation is a
held-out fifth of them, the test set is the same digits rotated by 30 degrees (a shift).
Give ``--init WEIGHTS`` (a state dict of the same network) to start from pretrained
weights instead of the seeded random init written once per sweep.

    python experiments/soup_my_tune_script.py --storage runs --name my-tune --samples 8
    ray submit cluster.yaml experiments/soup_my_tune_script.py --address auto --gpus 0.25
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import ray
import torch
import torch.nn.functional as F
from ray import tune

from raysoup.tune import SoupCallback  # raysoup

STATE_DICT_FILE = "model.pt"


# ---------------------------------------------------------------- data and model


_SPLITS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train / val (ID) / test (rotated: OOD) tensors; the same in every process (built
    once per process; a plain dict, not lru_cache: Ray ships this script's functions by
    value)."""
    if _SPLITS:
        return _SPLITS
    import torchvision.transforms.functional as TF
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = len(y) // 5
    val, train = order[:n_val], order[n_val:]
    rotated = TF.rotate(x[val], 30.0)
    _SPLITS.update(train=(x[train], y[train]), val=(x[val], y[val]), test=(rotated, y[val]))
    return _SPLITS


def make_model(arch: str) -> torch.nn.Module:
    if arch.startswith("timm:"):
        import timm

        return timm.create_model(arch[5:], num_classes=10)
    import torchvision

    return getattr(torchvision.models, arch)(num_classes=10)


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: str, device: str = "cpu") -> float:
    model.eval()
    x, y = splits()[split]
    correct = 0
    for start in range(0, len(y), 256):
        logits = model(x[start : start + 256].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + 256]).sum())
    return correct / len(y)


# ---------------------------------------------------------------- the Tune trainable


def train_fn(config: dict) -> None:
    """Fine-tune from the shared init; report val accuracy and a checkpoint every epoch."""
    torch.manual_seed(config["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model(config["arch"])
    model.load_state_dict(torch.load(config["init"], weights_only=True))
    model.to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    x, y = splits()["train"]
    generator = torch.Generator().manual_seed(config["seed"])
    for epoch in range(config["epochs"]):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), config["batch_size"]):
            batch = order[start : start + config["batch_size"]]
            loss = F.cross_entropy(model(x[batch].to(device)), y[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with tempfile.TemporaryDirectory() as folder:
            torch.save(
                {k: v.cpu() for k, v in model.state_dict().items()},
                os.path.join(folder, STATE_DICT_FILE),
            )
            tune.report(
                {"val_acc": accuracy(model, "val", device), "epoch": epoch},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )


# ---------------------------------------------------------------- how raysoup scores soups


def evaluator(arch: str, split: str):
    """A state dict's accuracy on ``split``: the same number the trainable reports."""

    def score(state_dict: dict[str, torch.Tensor]) -> float:
        model = make_model(arch)
        model.load_state_dict(state_dict)
        return accuracy(model, split)

    return score


# ---------------------------------------------------------------- the sweep


def shared_init(path: Path, arch: str, weights: str | None, pretrain_epochs: int) -> Path:
    """The one init every trial fine-tunes, written once (atomically): ``weights``, else a
    seeded random init trained for ``pretrain_epochs`` on the training split (offline, a
    stand-in for pretrained weights: soups average fine-tunings of a *trained* model)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = make_model(arch)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, y = splits()["train"]
        for _ in range(pretrain_epochs):
            model.train()
            for start in range(0, len(y), 64):
                loss = F.cross_entropy(model(x[start : start + 64]), y[start : start + 64])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="runs", help="where Tune and raysoup write")
    parser.add_argument("--name", default="my-tune", help="the experiment name")
    parser.add_argument("--samples", type=int, default=8, help="trials (Tune's num_samples)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="resnet18", help="torchvision name or timm:<name>")
    parser.add_argument("--init", default=None, help="pretrained state dict of --arch")
    parser.add_argument(
        "--pretrain-epochs", type=int, default=2, help="without --init: epochs of the shared init"
    )
    parser.add_argument("--address", default="local", help="'local' or 'auto' (a cluster)")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs per trial")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per trial")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray's CPUs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.samples < 1 or args.epochs < 1:
        raise SystemExit(f"--samples {args.samples} --epochs {args.epochs}: expected >= 1")
    storage = Path(args.storage).expanduser().resolve()
    init = shared_init(storage / args.name / "init.pt", args.arch, args.init, args.pretrain_epochs)
    if not ray.is_initialized():
        ray.init(address=args.address, num_cpus=args.num_cpus if args.address == "local" else None)

    soup = SoupCallback(  # raysoup
        storage=storage,
        name=args.name,
        metric="val_acc",
        state_dict_file=STATE_DICT_FILE,
        evaluate=evaluator(args.arch, "val"),
        evaluate_test=evaluator(args.arch, "test"),
    )
    tuner = tune.Tuner(
        tune.with_resources(train_fn, {"cpu": args.cpus, "gpu": args.gpus}),
        param_space={
            "arch": args.arch,
            "init": str(init),
            "epochs": args.epochs,
            "batch_size": 64,
            "lr": tune.choice([1e-5, 3e-5, 1e-4]),
            "weight_decay": tune.choice([0.0, 1e-4]),
            "seed": tune.randint(0, 10_000),
        },
        tune_config=tune.TuneConfig(
            num_samples=args.samples, search_alg=tune.search.BasicVariantGenerator(random_state=0)
        ),
        run_config=tune.RunConfig(
            name=args.name,
            storage_path=str(storage / "tune"),
            callbacks=[soup],  # raysoup
        ),
    )
    results = tuner.fit()
    rows = soup.finalize()  # raysoup
    best = results.get_best_result("val_acc", "max")
    print(f"best single trial: val {best.metrics['val_acc']:.4f}")
    for row in sorted(rows, key=lambda r: r["method"]):
        print(
            f"{row['method']:<8} {row['n_ingredients']:>2} ingredient(s)  "
            f"val {row['id_val_acc']:.4f}  test (rotated) {row['test_acc']:.4f}"
        )
    print(f"results: {storage / args.name / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
