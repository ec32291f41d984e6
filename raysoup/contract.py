"""The names of raysoup's user-facing contract (DESIGN.md), each defined once: the stages a
sweep runs, the inits a target trial starts from, the soup methods and acceptance rules,
and the columns that identify a soup group and a trial's hparams in the Parquet results.
Import-light on purpose: the CLI's fast path and the pure maths read them too."""

from __future__ import annotations

# In the order a sweep runs them (a later stage starts from an earlier one's checkpoints).
STAGES = ("base", "lp", "aux", "target")
SOUP_STAGE = "soup"  # the stage a soup checkpoint records (its folder: checkpoints/soup/)
INITS = ("pretrained", "ratatouille", "fusing")
METHODS = ("erm", "uniform", "greedy", "uniform_all", "ensemble")
ALL_SEEDS_METHODS = ("uniform_all",)  # rows over every trial seed: trial_seed == ALL_SEEDS
# Recipe 1 keeps a candidate when the soup's ID-val accuracy is >= ("ge", the reference
# code) or > ("gt") the current soup's.
ACCEPT = ("ge", "gt")
# Trials of one (dataset, test env, trial seed, init) are souped together.
GROUP_COLUMNS = ("dataset", "test_env", "trial_seed", "init")
ALL_SEEDS = -1  # the trial_seed of rows over every trial seed (uniform_all)


def group_slug(dataset: str, test_env: int, trial_seed: int, init: str) -> str:
    """A soup group's name in folders, part keys and figures: ``PACS-e0-s1-fusing``."""
    seed = "all" if trial_seed == ALL_SEEDS else trial_seed
    return f"{dataset}-e{test_env}-s{seed}-{init}"


HPARAM_COLUMNS = ("lr", "weight_decay", "batch_size", "resnet_dropout", "steps")
# The fourth Parquet dataset (``raysoup diagnose``) and what each of its rows measures.
DIAGNOSTICS = "diagnostics"
DIAGNOSTIC_PARTS = ("init_to_trial", "trial_to_trial", "soup_to_ingredient", "angle", "landscape")
# What ``raysoup results --format`` writes.
TABLE_FORMATS = ("text", "markdown", "csv", "latex", "html")

# The dataset recorded for an imported checkpoint whose training data nobody declared
# (``raysoup pool add --undeclared``): target sweeps refuse it unless told otherwise.
UNDECLARED = "undeclared"
