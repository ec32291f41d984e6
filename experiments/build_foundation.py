"""Train the built-in benchmark's foundation network and write it into the package.

    python experiments/build_foundation.py                 # the shipped recipe
    python experiments/build_foundation.py --out /tmp/f    # anywhere else, e.g. to compare

Deterministic on CPU (fixed seeds, a pre-rendered pool of glyph images): the same recipe
gives the same weights on the same machine. Prints the glyph validation accuracy as it
trains; the checkpoint records it (``metrics.val_acc``) next to the recipe
(``hparams``). ``tests/test_foundation.py`` checks the shipped file's hash and quality,
and that this recipe, shortened, still learns.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from raysoup.models.foundation import (
    FoundationRecipe,
    foundation_dir,
    save_foundation,
    train_foundation,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=foundation_dir(), help="checkpoint folder")
    defaults = FoundationRecipe()
    for field in dataclasses.fields(FoundationRecipe):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = FoundationRecipe(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(FoundationRecipe)}
    )
    state, metrics = train_foundation(recipe, log=lambda line: print(line, file=sys.stderr))
    meta = save_foundation(state, metrics, recipe, args.out)
    print(f"{args.out}: val_acc {metrics['val_acc']:.4f}, sha256 {meta.content_hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
