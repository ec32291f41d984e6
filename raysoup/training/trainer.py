"""One training run, usable without Ray: ``train_run(RunSpec(...))``.

Stages (what a run trains and starts from):

- ``base``   — the built-in "foundation" network, trained from scratch on all envs.
- ``lp``     — linear probe: the classifier head alone, on the frozen pretrained
  featurizer; kept at its best ID-val evaluation (as the reference keeps ``network_best``).
- ``aux``    — an auxiliary run: all envs of an auxiliary dataset (``test_env = -1``),
  from the pretrained featurizer and, in a sweep, the head of that dataset's LP; the last
  step is kept (the reference's ``featurizer_last``).
- ``target`` — a target run from one init strategy; the head comes from the LP
  checkpoint (``lp_head``). The best ID-val evaluation is kept by default (``keep``), as
  the reference's ``model_best.pkl``, which its soups load.

A run whose featurizer comes from the auxiliary pool, or that has no LP head to start
from, first trains the head alone for ``lp_steps`` steps (featurizer frozen, in eval
mode), then rebuilds Adam over all parameters, as ModelRatatouille does.

Evaluations (``eval_schedule``): ``reference`` evaluates where DomainBed's train.py does,
``step % CHECKPOINT_FREQ == 0`` on its 0-based step, i.e. after the 1st update, then
every ``CHECKPOINT_FREQ`` updates, and after the last; ``multiples`` after updates
``CHECKPOINT_FREQ``, ``2 CHECKPOINT_FREQ``, ... and the last. ``step`` in metrics counts
updates done (the reference's ``step`` + 1); a checkpoint's metrics are those of the
evaluation it kept, ``step`` included.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysoup.contract import HPARAM_COLUMNS, INITS, STAGES
from raysoup.data.base import MultiDomainDataset
from raysoup.data.builtin import BUILTIN_BASE
from raysoup.data.loaders import train_batches
from raysoup.data.registry import dataset_class, load_dataset
from raysoup.data.splits import EnvSplit, split_envs, training_envs
from raysoup.data.transforms import Preprocess, preprocess_record
from raysoup.devices import resolve_device
from raysoup.errors import RunsFailedError
from raysoup.io import storage
from raysoup.io.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    check_state_dict,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from raysoup.io.storage import default_cache_dir
from raysoup.models.foundation import foundation_dir
from raysoup.models.networks import (
    ARCHS,
    SMALL_ARCHS,
    Network,
    arch_preprocess,
    build_network,
    check_arch,
)
from raysoup.options import OptionsError, option
from raysoup.seeding import seed_hash
from raysoup.training.evaluate import evaluate_splits
from raysoup.training.hparams import REGISTRIES, sample_hparams
from raysoup.training.inits import (
    AUX_BUFFERS,
    CLASSIFIER_PREFIX,
    FEATURIZER_PREFIX,
    PRETRAINED,
    RATATOUILLE_CHOICES,
    InitPlan,
    discover_aux_pool,
    featurizer_from_plan,
    is_undeclared,
    plan_init,
    strip_prefix,
)

KEEP = ("last", "best")
EVAL_SCHEDULES = ("reference", "multiples")
BASE_RECIPE_VERSION = 1  # bump when the base network's training changes
DEFAULT_KEEP = {"base": "last", "lp": "best", "aux": "last", "target": "best"}


@dataclass
class RunSpec:
    """Everything that determines one run. Same spec, same result (on CPU: bit for bit)."""

    dataset: str = option(help="dataset name (built-in or DomainBed)")
    out: Path | str = option(help="directory (or URI, e.g. s3://...) the checkpoint goes to")
    test_env: int = option(0, help="held-out env index; -1 = train on all envs (auxiliary mode)")
    trial_seed: int = option(0, help="seed of the in/out splits (and of the LP)")
    hparams_seed: int = option(0, help="0 = default hyperparameters, else a seeded draw")
    init: str = option("pretrained", help="featurizer init", choices=INITS)
    stage: str = option("target", help="what this run is", choices=STAGES)
    data_dir: Path | None = option(None, help="root of on-disk DomainBed datasets")
    aux_dir: list[Path | str] = option(
        [], help="directories (or URIs) holding auxiliary checkpoints"
    )
    pretrained: Path | str | None = option(
        None, help="checkpoint whose featurizer is 'pretrained' (built-in: the base network)"
    )
    pretrained_weights: Path | None = option(
        None, help="explicit ImageNet weights file for ResNets (.safetensors or .pt)"
    )
    lp_head: Path | str | None = option(
        None, help="LP checkpoint (path or URI) whose classifier head starts the run"
    )
    lp_per_trial_seed: bool = option(
        False,
        help="the LP head must come from this run's own trial seed; default: trial seed 0's "
        "head is accepted too (one LP per dataset and test env, shared, as the reference)",
    )
    steps: int | None = option(None, help="training steps (default: the dataset's N_STEPS)")
    checkpoint_freq: int | None = option(
        None, help="evaluate every N steps (default: the dataset's CHECKPOINT_FREQ)"
    )
    eval_schedule: str = option(
        "reference",
        help="reference: after update 1, 1+N, 1+2N, ... and the last (DomainBed's "
        "step %% N == 0); multiples: after updates N, 2N, ... and the last",
        choices=EVAL_SCHEDULES,
    )
    arch: str | None = option(
        None, help=f"network (default: the dataset's): one of {', '.join(ARCHS)} or timm:<name>"
    )
    image_size: int | None = option(
        None,
        help="input size the images are resized to (default: the model's own; the built-in "
        "images as stored for cnn, glyphcnn and ResNets)",
    )
    hparams_registry: str = option("diwa", help="hyperparameter distributions", choices=REGISTRIES)
    hparams_depend_on_trial_seed: bool = option(
        False, help="seed hparams with (hparams_seed, trial_seed) like the reference code"
    )
    hparams: dict[str, Any] = option({}, help="hyperparameter overrides, e.g. '{\"lr\": 1e-4}'")
    fusing_range: float = option(4.0, help="R in lambda = softmax(R*u); 0 = uniform average")
    ratatouille_choice: str = option(
        "reference", help="how ratatouille picks its auxiliary run", choices=RATATOUILLE_CHOICES
    )
    aux_buffers: str = option(
        "source",
        help="BatchNorm statistics of an aux init: from its sources, or pretrained (reference)",
        choices=AUX_BUFFERS,
    )
    allow_undeclared_aux: bool = option(
        False, help="accept auxiliary checkpoints whose training data is undeclared (marked)"
    )
    holdout_fraction: float = option(0.2, help="fraction of each env held out as 'out'")
    keep: str | None = option(
        None,
        help="which evaluation to save: best ID-val (strict >, the first maximum) or last "
        "(default: best for lp and target runs, last for base and aux runs)",
        choices=KEEP,
    )
    freeze_bn: bool = option(True, help="ResNet: keep ImageNet BatchNorm statistics (DomainBed)")
    device: str = option("auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'...")
    amp: bool = option(False, help="bfloat16 autocast (mixed precision)")
    num_workers: int = option(0, help="data-loading worker processes (on-disk datasets)")
    cache_dir: Path | None = option(
        None, help="where the built-in base network is cached (default ~/.cache/raysoup)"
    )

    def validate(self) -> type[MultiDomainDataset]:
        """Check everything that can be checked without loading data or weights."""
        try:
            cls = dataset_class(self.dataset)
            training_envs(len(cls.ENVIRONMENTS), self.test_env)
        except ValueError as error:  # an unknown dataset, a test env it does not have
            raise OptionsError(str(error)) from None
        for name in ("trial_seed", "hparams_seed"):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name}={getattr(self, name)}: expected an integer >= 0")
        if self.steps is not None and self.steps < 1:
            raise OptionsError(f"steps={self.steps}: expected a positive integer")
        if self.checkpoint_freq is not None and self.checkpoint_freq < 1:
            raise OptionsError(
                f"checkpoint_freq={self.checkpoint_freq}: expected a positive integer"
            )
        if not 0 < self.holdout_fraction < 1:
            raise OptionsError(
                f"holdout_fraction={self.holdout_fraction}: expected a value in (0, 1)"
            )
        for name, choices in (("eval_schedule", EVAL_SCHEDULES), ("keep", (None, *KEEP))):
            if getattr(self, name) not in choices:
                raise OptionsError(
                    f"{name}={getattr(self, name)!r}: expected one of {[c for c in choices if c]}"
                )
        if self.fusing_range < 0:
            raise OptionsError(f"fusing_range={self.fusing_range}: expected a number >= 0")
        if self.stage in ("base", "aux") and self.test_env != -1:
            raise OptionsError(f"stage {self.stage!r} trains on all envs: use test_env=-1")
        if self.stage != "target" and self.init != "pretrained":
            raise OptionsError(
                f"init={self.init!r} only applies to target runs (stage {self.stage!r})"
            )
        if self.init != "pretrained" and not self.aux_dir:
            raise OptionsError(
                f"init={self.init!r} needs auxiliary checkpoints: give --aux-dir DIR"
            )
        for path in self.aux_dir:
            if not storage.is_dir(path):
                raise OptionsError(f"aux_dir {path} does not exist")
        for name in ("pretrained", "lp_head"):
            path = getattr(self, name)
            if path is not None and not storage.is_checkpoint(path):
                raise OptionsError(f"{name}={path}: not a checkpoint directory")
        if self.pretrained_weights is not None and not Path(self.pretrained_weights).exists():
            raise OptionsError(
                f"pretrained_weights={self.pretrained_weights}: no such file or folder"
            )
        if self.arch is not None:
            try:
                check_arch(self.arch)
            except ValueError as error:
                raise OptionsError(str(error)) from None
        if self.image_size is not None and self.image_size < 1:
            raise OptionsError(f"image_size={self.image_size}: expected a positive integer")
        if not cls.IS_BUILTIN and self.data_dir is None:
            raise OptionsError(f"dataset {self.dataset!r} is read from disk: give --data-dir")
        if self.stage == "base" and not cls.IS_BUILTIN:
            raise OptionsError("stage 'base' pretrains the built-in network; ResNets use ImageNet")
        self.resolve_device()
        return cls

    def resolve_device(self) -> torch.device:
        return resolve_device(self.device)


# ---------------------------------------------------------------- base network


def base_spec(out: Path, device: str = "auto") -> RunSpec:
    """The built-in foundation network's run (deterministic: fixed seeds, default hparams)."""
    return RunSpec(dataset=BUILTIN_BASE, out=out, test_env=-1, stage="base", device=device)


def _recipe(spec: RunSpec) -> dict[str, Any]:
    """Everything that determines a run's weights except where it is written and run."""
    return {k: v for k, v in asdict(spec).items() if k not in ("out", "device", "cache_dir")}


def base_cache_path(device: torch.device, cache_dir: Path | None = None) -> Path:
    """Where the cache keeps the built-in base network trained on ``device`` here: keyed by
    its recipe and, on CPU, torch's thread count (reductions split over threads add in
    another order: another count gives other bits)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    recipe = seed_hash(sorted(_recipe(base_spec(Path("."))).items()))
    where = f"cpu{torch.get_num_threads()}t" if device.type == "cpu" else device.type
    return cache / f"base-{BUILTIN_BASE}-v{BASE_RECIPE_VERSION}-{recipe}-{where}"


def ensure_base_checkpoint(cache_dir: Path | None = None, device: str = "auto") -> Path:
    """The built-in base network, trained once and cached (idempotent, atomic)."""
    spec = base_spec(Path("."), device)
    target = base_cache_path(spec.resolve_device(), cache_dir)
    if not is_checkpoint(target):
        print(f"raysoup: training the built-in base network into {target}", file=sys.stderr)
        train_run(base_spec(target, device))
    return target


def _cached_base_for(spec: RunSpec) -> Path | None:
    """The cache entry that holds the same bits as the base run ``spec`` would train here,
    or ``None`` when ``spec`` is not the built-in base's recipe."""
    if spec.stage != "base" or _recipe(spec) != _recipe(base_spec(Path("."))):
        return None
    return base_cache_path(spec.resolve_device(), spec.cache_dir)


def adopt_cached_base(spec: RunSpec) -> Path | None:
    """A sweep's base run: copy the cached base network trained the same way (recipe,
    device, threads: the same bits) to ``spec.out`` instead of training it again. Returns
    the cache entry copied, or ``None`` (nothing usable cached: train it)."""
    cached = _cached_base_for(spec)
    if cached is None or not is_checkpoint(cached) or storage.checkpoint_damage(cached):
        return None
    storage.publish_checkpoint(cached, spec.out)
    return cached


def cache_base(spec: RunSpec) -> None:
    """After a sweep trained its base run ``spec``: keep a copy in this node's cache for
    the next sweep (never replacing an entry already there)."""
    cached = _cached_base_for(spec)
    if cached is not None and not is_checkpoint(cached):
        storage.publish_checkpoint(storage.local_checkpoint(spec.out), cached)


# ---------------------------------------------------------------- the run


def _load_part(module: nn.Module, path: Path | str, prefix: str) -> None:
    state, _ = load_checkpoint(storage.local_checkpoint(path))
    part = strip_prefix(state, prefix)
    check_state_dict(part, module.state_dict(), storage.join(path, WEIGHTS_FILE))
    module.load_state_dict(part)


SHARED_LP_SEED = 0  # the reference trains its one LP per (dataset, test env) on trial seed 0


def lp_head_problem(
    run: tuple[str, int, int], head: tuple[str, int, int], per_trial_seed: bool
) -> str | None:
    """Why an LP head trained for ``head`` = (dataset, test_env, trial_seed) cannot start
    run ``run`` (same triple), or ``None`` when it can.

    The dataset and the test env must match: a head from another test env has trained on
    this run's held-out env. The trial seed must match too with ``per_trial_seed``;
    otherwise the shared head of trial seed 0 is accepted for every trial seed (the
    reference's shared LP; its ``in`` splits overlap other seeds' ID-val ``out`` splits).
    """
    if head[:2] != run[:2]:
        return "a head from another dataset or test env would have seen held-out data"
    if head[2] == run[2] or (not per_trial_seed and head[2] == SHARED_LP_SEED):
        return None
    if per_trial_seed:
        return "lp_per_trial_seed asks for a head of this run's own trial seed"
    return f"only a head of this run's trial seed or the shared one (seed {SHARED_LP_SEED}) fits"


def _check_lp_head(spec: RunSpec, path: Path | str) -> None:
    meta = storage.read_meta(path)
    run = (spec.dataset, spec.test_env, spec.trial_seed)
    head = (meta.dataset, meta.test_env, meta.trial_seed)
    problem = lp_head_problem(run, head, spec.lp_per_trial_seed)
    if problem is not None:
        raise CheckpointError(
            f"{path}: LP head was trained for (dataset, test_env, trial_seed)={head}, "
            f"this run is {run}: {problem}"
        )


def resolve_arch(
    spec: RunSpec, dataset_cls: type[MultiDomainDataset], hparams: dict[str, Any]
) -> str:
    """The network of a run: ``--arch``, else the dataset's; the ``resnet18`` hparam
    (DomainBed's switch) turns a ResNet-50 into a ResNet-18."""
    arch = spec.arch or dataset_cls.DEFAULT_ARCH
    if arch in ("resnet18", "resnet50") and hparams.get("resnet18"):
        return "resnet18"
    return arch


def build_start_network(
    spec: RunSpec, dataset_cls: type[MultiDomainDataset], hparams: dict[str, Any]
) -> tuple[Network, InitPlan, str]:
    """The network a run starts from, its init plan, and where 'pretrained' came from."""
    arch = resolve_arch(spec, dataset_cls, hparams)
    imagenet = arch not in SMALL_ARCHS and spec.stage != "base"
    network = build_network(
        arch,
        dataset_cls.NUM_CLASSES,
        input_channels=dataset_cls.INPUT_SHAPE[0],
        dropout=float(hparams.get("resnet_dropout", 0.0)),
        nonlinear_classifier=bool(hparams.get("nonlinear_classifier", False)),
        imagenet=imagenet,
        weights_path=spec.pretrained_weights,
        freeze_bn=spec.freeze_bn,
        image_size=spec.image_size,
    )
    if spec.stage == "base":
        return network, InitPlan("scratch", [], []), "scratch"
    if arch in SMALL_ARCHS:
        # glyphcnn: the foundation shipped in the package; cnn: the base trained and cached
        pretrained = spec.pretrained or (
            foundation_dir()
            if arch == "glyphcnn"
            else ensure_base_checkpoint(spec.cache_dir, spec.device)
        )
        _load_part(network.featurizer, pretrained, FEATURIZER_PREFIX)
        pretrained_from = str(pretrained)
    else:
        pretrained_from = str(spec.pretrained_weights or "imagenet")
    plan = InitPlan("pretrained", [PRETRAINED], [1.0])
    if spec.stage == "target" and spec.init != "pretrained":
        pool = discover_aux_pool(spec.aux_dir, spec.dataset, spec.allow_undeclared_aux)
        if not pool.runs:
            raise CheckpointError(
                f"no usable auxiliary checkpoints under {[str(p) for p in spec.aux_dir]} "
                f"(excluded by the leakage guard: {len(pool.excluded)})"
            )
        seed = seed_hash("init", spec.dataset, spec.test_env, spec.trial_seed, spec.hparams_seed)
        plan = plan_init(
            spec.init,
            pool.as_lists(),
            hparams_seed=spec.hparams_seed,
            seed=seed,
            fusing_range=spec.fusing_range,
            ratatouille_choice=spec.ratatouille_choice,
        )
        featurizer = featurizer_from_plan(
            plan,
            network.featurizer.state_dict(),
            spec.dataset,
            spec.aux_buffers,
            spec.allow_undeclared_aux,
        )
        network.featurizer.load_state_dict(featurizer)
    if spec.lp_head is not None:
        _check_lp_head(spec, spec.lp_head)
        _load_part(network.classifier, spec.lp_head, CLASSIFIER_PREFIX)
    return network, plan, pretrained_from


def is_eval_step(done: int, steps: int, freq: int, schedule: str) -> bool:
    """Whether a run of ``steps`` updates evaluates after update number ``done`` (1-based).

    ``reference``: DomainBed's ``step % CHECKPOINT_FREQ == 0 or step == n_steps - 1`` on
    its 0-based ``step = done - 1``: after the first update, then every ``freq``, and the
    last. ``multiples``: after every ``freq``-th update and the last.
    """
    if schedule not in EVAL_SCHEDULES:
        raise ValueError(f"eval_schedule={schedule!r}: expected one of {EVAL_SCHEDULES}")
    if done == steps:
        return True
    return (done - 1) % freq == 0 if schedule == "reference" else done % freq == 0


class KeepBest:
    """The evaluation a ``keep="best"`` run saves: the first one with the highest score
    (strictly greater replaces, as the reference's ``current_score > best_score``)."""

    def __init__(self) -> None:
        self.score = -math.inf
        self.state: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, Any] = {}

    def offer(
        self, score: float, metrics: dict[str, Any], state: Callable[[], dict[str, torch.Tensor]]
    ) -> bool:
        """Keep ``state()`` (called only then) if ``score`` beats every earlier one."""
        if not score > self.score:  # NaN never wins
            return False
        self.score, self.state, self.metrics = score, state(), metrics
        return True


class NonFiniteLossError(RunsFailedError, FloatingPointError):
    """The training loss became NaN or infinite: this run diverged (a failure of the run,
    not of the sweep)."""


class FiniteLossGuard:
    """Notes the first non-finite training loss without a host sync on every step.

    ``observe`` keeps, on the loss's device, the first step whose loss is NaN or
    infinite and that loss; ``check`` (one sync: call it where the loop syncs anyway, at
    evaluations and at the end) raises ``NonFiniteLossError`` naming them.
    """

    def __init__(self) -> None:
        self._step: torch.Tensor | None = None  # -1 while every loss was finite
        self._loss: torch.Tensor | None = None

    def observe(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        if self._step is None:
            self._step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._loss = torch.zeros((), device=loss.device)
        first = (self._step < 0) & ~torch.isfinite(loss)
        self._step = torch.where(first, torch.full_like(self._step, step), self._step)
        self._loss = torch.where(first, loss, self._loss)

    def check(self, lr: float | None = None) -> None:
        if self._step is None or int(self._step) < 0:
            return
        assert self._loss is not None
        hint = f" with lr {lr:g}" if lr is not None else ""
        raise NonFiniteLossError(
            f"training loss is {float(self._loss)} at step {int(self._step)}: the run "
            f"diverged{hint} (or started from non-finite weights); try a lower lr"
        )


def _optimizer(params: list[nn.Parameter], hparams: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        params, lr=float(hparams["lr"]), weight_decay=float(hparams["weight_decay"])
    )


# ---------------------------------------------------------------- the steps of a run
#
# ``train_run`` calls these in order. The order is part of the result: torch's global
# generator is seeded once, just before the network is built, and the network's init,
# then dropout and augmentations in the loop, draw from it in turn.


@dataclass(frozen=True)
class RunSettings:
    """What a spec resolves to before any data or weights are read."""

    dataset_cls: type[MultiDomainDataset]
    device: torch.device
    hparams: dict[str, Any]
    steps: int
    freq: int  # the evaluation frequency (``is_eval_step``)
    keep: str  # which evaluation is saved: "best" or "last"
    preprocess: Preprocess | None  # the model's input (``None``: the images as stored)


def resolve_settings(spec: RunSpec) -> RunSettings:
    """Validate ``spec``; resolve its device, hyperparameters, steps, evaluation frequency
    and kept evaluation (the dataset's and the stage's defaults where ``spec`` has none)."""
    dataset_cls = spec.validate()
    device = spec.resolve_device()
    hparams = sample_hparams(
        spec.dataset,
        spec.hparams_seed,
        spec.trial_seed,
        registry=spec.hparams_registry,
        small_images=dataset_cls.SMALL_IMAGES,
        hparams_depend_on_trial_seed=spec.hparams_depend_on_trial_seed,
        overrides=spec.hparams,
    )
    arch = resolve_arch(spec, dataset_cls, hparams)
    return RunSettings(
        dataset_cls=dataset_cls,
        device=device,
        hparams=hparams,
        steps=spec.steps or dataset_cls.N_STEPS,
        freq=spec.checkpoint_freq or dataset_cls.CHECKPOINT_FREQ,
        keep=spec.keep or DEFAULT_KEEP[spec.stage],
        preprocess=arch_preprocess(
            arch,
            on_disk=not dataset_cls.IS_BUILTIN,
            image_size=spec.image_size,
            weights_path=spec.pretrained_weights,
            default_size=dataset_cls.INPUT_SHAPE[-1],
        ),
    )


@dataclass(frozen=True)
class RunData:
    """A run's dataset, the in/out split of each of its envs, and the envs it trains on."""

    dataset: MultiDomainDataset
    splits: list[EnvSplit]
    train_envs: list[int]


def load_run_data(spec: RunSpec, settings: RunSettings) -> RunData:
    """The dataset of ``spec``, split by its trial seed (the splits draw from their own
    seeded generators, not torch's)."""
    dataset = load_dataset(
        spec.dataset,
        spec.data_dir,
        augment=bool(settings.hparams["data_augmentation"]),
        preprocess=settings.preprocess,
    )
    splits = split_envs(dataset.env_sizes(), spec.trial_seed, spec.holdout_fraction)
    return RunData(dataset, splits, training_envs(len(dataset.envs), spec.test_env))


def run_seed(spec: RunSpec) -> int:
    """The seed of a run's own draws (init, dropout, batches): the run's identity alone."""
    return seed_hash(
        spec.dataset, spec.stage, spec.test_env, spec.trial_seed, spec.hparams_seed, spec.init
    )


def build_model(spec: RunSpec, settings: RunSettings, seed: int) -> tuple[Network, InitPlan, str]:
    """The network a run starts from, on its device, with its init plan and where
    'pretrained' came from. Seeds torch's global generator first, so that the random
    init (and everything drawn after it) is the same in any process."""
    torch.manual_seed(seed)
    network, plan, pretrained_from = build_start_network(
        spec, settings.dataset_cls, settings.hparams
    )
    network.to(settings.device)
    return network, plan, pretrained_from


def head_only_steps(spec: RunSpec, plan: InitPlan, hparams: dict[str, Any], steps: int) -> int:
    """How many first steps train the classifier head alone: all of an LP's; ``lp_steps``
    for an aux or target run whose featurizer comes from the pool or that has no LP head
    to start from (its head would be random); none otherwise."""
    if spec.stage == "lp":
        return steps
    if spec.stage in ("aux", "target") and (plan.uses_auxiliary or spec.lp_head is None):
        return min(int(hparams["lp_steps"]), steps)
    return 0


Batch = tuple[torch.Tensor, torch.Tensor]


def batch_streams(
    spec: RunSpec, settings: RunSettings, data: RunData, seed: int
) -> list[Iterator[Batch]]:
    """One endless stream of training batches per training env, each seeded from the run
    and its env (lazy: nothing is drawn before the loop asks)."""
    augment = bool(settings.hparams["data_augmentation"])
    return [
        train_batches(
            data.dataset,
            env,
            data.splits[env].in_indices,
            int(settings.hparams["batch_size"]),
            seed_hash("batches", seed, env),
            augment=augment,
            num_workers=spec.num_workers,
            pin_memory=settings.device.type == "cuda",
        )
        for env in data.train_envs
    ]


def set_phase(network: Network, hparams: dict[str, Any], head_only: bool) -> torch.optim.Optimizer:
    """Put ``network`` in training mode for one phase and return a fresh Adam over what
    trains in it: the head alone (the featurizer frozen and in eval mode: no BatchNorm
    updates, no dropout) or every parameter."""
    network.train()
    for p in network.featurizer.parameters():
        p.requires_grad_(not head_only)
    if head_only:
        network.featurizer.eval()
        return _optimizer(list(network.classifier.parameters()), hparams)
    return _optimizer(list(network.parameters()), hparams)


def next_batch(streams: list[Iterator[Batch]], device: torch.device) -> Batch:
    """The next batch of every training env, concatenated, on ``device``."""
    xs, ys = zip(*(next(stream) for stream in streams), strict=True)
    return torch.cat(xs).to(device, non_blocking=True), torch.cat(ys).to(device, non_blocking=True)


def _cpu_state(network: nn.Module, copy: bool) -> dict[str, torch.Tensor]:
    """``network``'s state on the CPU; ``copy``: never sharing memory with the network (a
    kept evaluation must survive the updates after it)."""
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    return {k: v.clone() for k, v in state.items()} if copy else state


@dataclass
class TrainLog:
    """What the training loop leaves besides the trained network."""

    history: list[dict[str, Any]]  # every evaluation's metrics, in order
    last: dict[str, Any]  # the last evaluation's metrics
    best: KeepBest  # the best evaluation (offered only with keep="best")
    clock: dict[str, float]  # host seconds spent on data and on evaluations
    loop_started: float  # time.perf_counter() when the loop began


def train_loop(
    spec: RunSpec,
    settings: RunSettings,
    data: RunData,
    network: Network,
    streams: list[Iterator[Batch]],
    head_only: int,
    started: float,
    on_eval: Callable[[dict[str, Any]], None] | None,
) -> TrainLog:
    """Train ``network`` for ``settings.steps`` updates (the first ``head_only`` on the
    head alone), evaluating on the schedule; ``started`` (``time.time()``) is the run's
    start, for the metrics' ``wall_s``."""
    device, hparams = settings.device, settings.hparams
    optimizer = set_phase(network, hparams, head_only > 0)
    loss_fn = nn.CrossEntropyLoss()
    log = TrainLog([], {}, KeepBest(), {"data_s": 0.0, "eval_s": 0.0}, time.perf_counter())
    guard = FiniteLossGuard()
    for step in range(settings.steps):
        if head_only and step == head_only:  # never true for LP (all head-only)
            optimizer = set_phase(network, hparams, False)
        fetch_started = time.perf_counter()
        x, y = next_batch(streams, device)
        log.clock["data_s"] += time.perf_counter() - fetch_started
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.amp):
            loss = loss_fn(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        guard.observe(step + 1, loss)
        if not is_eval_step(step + 1, settings.steps, settings.freq, spec.eval_schedule):
            continue
        guard.check(float(hparams["lr"]))  # before evaluating a diverged network
        eval_started = time.perf_counter()
        metrics = evaluate_splits(
            network,
            data.dataset,
            data.splits,
            spec.test_env,
            device,
            amp=spec.amp,
            num_workers=spec.num_workers,
        )
        log.clock["eval_s"] += time.perf_counter() - eval_started
        metrics.update(step=step + 1, loss=loss.item(), wall_s=time.time() - started)
        log.history.append(metrics)
        log.last = metrics
        if settings.keep == "best":
            log.best.offer(metrics["id_val_acc"], metrics, lambda: _cpu_state(network, True))
        if on_eval is not None:
            on_eval(metrics)
    return log


def kept_evaluation(
    log: TrainLog, network: Network, keep: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state and metrics a run saves: its best ID-val evaluation with ``keep="best"``
    (when any was scored: a NaN never is), else the network as the last step left it."""
    if keep == "best" and log.best.state is not None:
        return log.best.state, log.best.metrics
    return _cpu_state(network, False), log.last


def checkpoint_meta(
    spec: RunSpec,
    settings: RunSettings,
    plan: InitPlan,
    pretrained_from: str,
    final: dict[str, Any],
) -> CheckpointMeta:
    """What the checkpoint records about its making (its content hash is added on save)."""
    cls = settings.dataset_cls
    return CheckpointMeta(
        dataset=spec.dataset,
        envs=list(cls.ENVIRONMENTS),
        arch=resolve_arch(spec, cls, settings.hparams),
        num_classes=cls.NUM_CLASSES,
        stage=spec.stage,
        test_env=spec.test_env,
        trial_seed=spec.trial_seed,
        hparams_seed=spec.hparams_seed,
        hparams=dict(
            settings.hparams,
            steps=settings.steps,
            keep=settings.keep,
            checkpoint_freq=settings.freq,
            eval_schedule=spec.eval_schedule,
            **preprocess_record(settings.preprocess, spec.image_size),
        ),
        init={
            "strategy": plan.strategy,
            "sources": plan.sources,
            "weights": plan.weights,
            "pretrained_from": pretrained_from,
            "undeclared_sources": undeclared_sources(plan),
        },
        metrics={k: v for k, v in final.items() if isinstance(v, (int, float))},
    )


def save_run_checkpoint(
    out: Path | str, state: dict[str, torch.Tensor], meta: CheckpointMeta
) -> CheckpointMeta:
    """Save the checkpoint to ``out`` (local: in place; URI: staged, then published) and
    return its metadata with the content hash."""
    with storage.checkpoint_output(out) as local:
        return save_checkpoint(local, state, meta)


def undeclared_sources(plan: InitPlan) -> int:
    """How many of a run's init sources were trained on undeclared data (the table marks
    such runs)."""
    return sum(1 for s in plan.sources if s != PRETRAINED and is_undeclared(storage.read_meta(s)))


def run_result(
    spec: RunSpec,
    settings: RunSettings,
    plan: InitPlan,
    final: dict[str, Any],
    meta: CheckpointMeta,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """The metrics ``train_run`` returns (a ``trials`` row's fields, and the history)."""
    hparams = settings.hparams
    return {
        "dataset": spec.dataset,
        "stage": spec.stage,
        "test_env": spec.test_env,
        "trial_seed": spec.trial_seed,
        "hparams_seed": spec.hparams_seed,
        "init": spec.init if spec.stage == "target" else plan.strategy,
        "init_sources": plan.sources,
        "init_weights": plan.weights,
        "undeclared_sources": undeclared_sources(plan),
        **{k: hparams[k] for k in HPARAM_COLUMNS if k != "steps"},
        "steps": settings.steps,
        **final,
        "checkpoint": str(spec.out),
        "content_hash": meta.content_hash,
        "device": str(settings.device),
        "history": history,
    }


def train_run(
    spec: RunSpec, on_eval: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train one run, save its checkpoint to ``spec.out`` and return its metrics."""
    started = time.time()
    settings = resolve_settings(spec)
    data = load_run_data(spec, settings)
    seed = run_seed(spec)
    network, plan, pretrained_from = build_model(spec, settings, seed)
    streams = batch_streams(spec, settings, data, seed)
    head_only = head_only_steps(spec, plan, settings.hparams, settings.steps)
    log = train_loop(spec, settings, data, network, streams, head_only, started, on_eval)
    state, final = kept_evaluation(log, network, settings.keep)
    loop_s = time.perf_counter() - log.loop_started
    final = dict(final, wall_s=time.time() - started, loop_s=loop_s, **log.clock)
    meta = checkpoint_meta(spec, settings, plan, pretrained_from, final)
    meta = save_run_checkpoint(spec.out, state, meta)
    return run_result(spec, settings, plan, final, meta, log.history)


def result_json(result: dict[str, Any]) -> str:
    """The one-line JSON `raysoup train` prints (``nan`` becomes ``null``)."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in result.items()
        if k != "history"
    }
    return json.dumps(clean, sort_keys=True)
