"""Draw a few images of every environment of the built-in benchmark into a PNG.

python experiments/show_builtin.py --out builtin.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from raysoup.data.builtin import BUILTIN_DATASETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("builtin.png"))
    parser.add_argument("--per-env", type=int, default=10, help="images per environment")
    args = parser.parse_args()
    rows = [
        (cls.NAME, name, env)
        for cls in BUILTIN_DATASETS
        for name, env in zip(cls.ENVIRONMENTS, cls().envs, strict=True)
    ]
    fig, axes = plt.subplots(len(rows), args.per_env, figsize=(args.per_env * 0.9, len(rows) * 1.0))
    for r, (dataset, env_name, env) in enumerate(rows):
        for c in range(args.per_env):
            ax = axes[r, c]
            ax.imshow(env.images[c].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(str(int(env.labels[c])), fontsize=7, pad=1)
        axes[r, 0].set_ylabel(
            f"{dataset}\n{env_name}", fontsize=6, rotation=0, ha="right", va="center"
        )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
