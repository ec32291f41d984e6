"""The sweep config: one typed object drives the YAML file, its validation and the CLI.

Everything that can be wrong with a config is reported by :meth:`SweepConfig.validate`
before Ray starts: unknown keys, wrong types, impossible values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from raysoup.contract import ACCEPT, INITS
from raysoup.data.builtin import BUILTIN_AUXILIARY, BUILTIN_TARGET
from raysoup.data.nuisance import NUISANCE_AUXILIARY, NUISANCE_TARGET
from raysoup.data.registry import dataset_class
from raysoup.io import storage
from raysoup.io.storage import Location
from raysoup.models.networks import ARCHS, check_arch
from raysoup.options import OptionsError, from_mapping, option
from raysoup.sweep import QUICKSTART_NAME
from raysoup.training.hparams import REGISTRIES, sample_hparams
from raysoup.training.inits import AUX_BUFFERS, RATATOUILLE_CHOICES
from raysoup.training.trainer import EVAL_SCHEDULES, KEEP

# Options added after the first sweeps were recorded, each with the value that computes
# what a sweep recorded without it computed. At that value an option drops out of the
# fingerprint, so such a sweep still matches its record; see ``adopt_record``.
ADDED_LATER: dict[str, Any] = {
    "aux_pool": None,
    "hparams": {},
    "target_keep": "last",
    "eval_schedule": "multiples",
    "aux_lp": False,
    "lp_per_trial_seed": True,
    "aux_dirs": [],
    "allow_undeclared_aux": False,
    "image_size": None,
}
# Options whose default changed since the first sweeps were recorded: the earlier default.
EARLIER_DEFAULTS: dict[str, Any] = {"aux_n_hparams": 1}
# Options that say how a sweep runs, not what it computes: a resume may change them.
RUN_KNOBS = (
    "max_concurrent_trials",
    "max_failures",
    "reuse_workers",
    "soup_cpus",
    "soup_gpus",
    "soup_max_models",
    "soup_every_s",
    "tune_verbose",
)
# Version of sweep.json (a record without "version" predates the options above).
RECORD_VERSION = 2
# What an aux_pool must be (said by every error about one).
AUX_POOL_EXPECTED = (
    "expected the folder <storage>/<name> of a sweep or auxiliary pool: a local path or a "
    "URI such as s3://bucket/runs/pool"
)


def check_aux_pool_location(value: Location) -> None:
    """Raise ``OptionsError`` naming ``value`` unless it is a directory that can be read
    (a local one, ``~`` expanded, or a URI's prefix)."""
    problem = storage.dir_problem(value)
    if problem is not None:
        raise OptionsError(f"aux_pool={str(value)!r}: {problem} ({AUX_POOL_EXPECTED})")


@dataclasses.dataclass
class SweepConfig:
    """A whole ratatouille / soups experiment."""

    name: str = option(QUICKSTART_NAME, help="experiment name: the folder under the storage")
    dataset: str | None = option(
        BUILTIN_TARGET, help="target dataset; null: train only the auxiliary pool (no target)"
    )
    data_dir: Path | None = option(None, help="root of on-disk DomainBed datasets")
    test_envs: list[int] = option([5], help="held-out env of each target sweep")
    trial_seeds: list[int] = option([0], help="split / LP seeds: replicates of the sweep")
    n_hparams: int = option(3, help="hparams seeds 0..n-1 per (test env, trial seed, init)")
    inits: list[str] = option(list(INITS), help="init strategies to sweep")
    aux_datasets: list[str] = option(
        list(BUILTIN_AUXILIARY[:3]), help="auxiliary datasets to fine-tune the pool on"
    )
    aux_n_hparams: int = option(
        4, help="auxiliary runs per auxiliary dataset (ModelRatatouille's README: 4)"
    )
    aux_lp: bool = option(
        True,
        help="one LP per auxiliary dataset (all envs, trial seed 0) whose head starts its "
        "auxiliary runs, all parameters trainable from the first step (reference); false: "
        "no aux LP, aux runs first train the head alone for lp_steps at their own lr",
    )
    aux_pool: Path | str | None = option(
        None,
        help="experiment folder (<storage>/<name>, a path or a URI such as "
        "s3://bucket/runs/pool) of a finished sweep or auxiliary pool: target runs take its "
        "auxiliary runs instead of training an aux stage here",
    )
    steps: int | None = option(None, help="target run steps (default: dataset N_STEPS)")
    aux_steps: int | None = option(None, help="auxiliary run steps (default: dataset N_STEPS)")
    lp_stage_steps: int | None = option(None, help="linear-probe steps (default: N_STEPS)")
    lp_per_trial_seed: bool = option(
        False,
        help="one target LP per (test env, trial seed); default: one per test env, on trial "
        "seed 0's splits, shared by every trial seed (reference)",
    )
    target_keep: str = option(
        "best",
        help="the evaluation a target run keeps: best ID-val (reference's model_best.pkl) or last",
        choices=KEEP,
    )
    checkpoint_freq: int | None = option(
        None, help="evaluate every N steps (default: the dataset's CHECKPOINT_FREQ)"
    )
    eval_schedule: str = option(
        "reference",
        help="reference: after update 1, 1+N, 1+2N, ... and the last (DomainBed); "
        "multiples: after updates N, 2N, ... and the last",
        choices=EVAL_SCHEDULES,
    )
    arch: str | None = option(
        None, help=f"network (default: the dataset's): {', '.join(ARCHS)} or timm:<name>"
    )
    pretrained_weights: Path | None = option(
        None,
        help="pretrained featurizer of ResNets and timm:<name>: a timm / torchvision / Hugging "
        "Face weights file, a save_pretrained folder, a Hugging Face cache entry or a raysoup "
        "checkpoint (`raysoup import-featurizer`)",
    )
    image_size: int | None = option(
        None, help="input size images are resized to (default: the model's own)"
    )
    aux_dirs: list[str] = option(
        [],
        help="folders (or URIs) of foreign auxiliary checkpoints (`raysoup pool add`) that join "
        "the auxiliary pool of ratatouille and fusing trials",
    )
    allow_undeclared_aux: bool = option(
        False,
        help="use aux_dirs checkpoints whose training data is undeclared (the trials table "
        "marks the runs using them in undeclared_sources)",
    )
    hparams_registry: str = option("diwa", help="hparam distributions", choices=REGISTRIES)
    hparams_depend_on_trial_seed: bool = option(False, help="reference-style hparam seeding")
    hparams: dict[str, Any] = option(
        {}, help="hyperparameter overrides for every LP, aux and target run, e.g. {batch_size: 16}"
    )
    fusing_range: float = option(4.0, help="R in lambda = softmax(R*u)")
    ratatouille_choice: str = option("reference", help="aux choice", choices=RATATOUILLE_CHOICES)
    aux_buffers: str = option("source", help="BatchNorm stats of aux inits", choices=AUX_BUFFERS)
    holdout_fraction: float = option(0.2, help="fraction of each env held out")
    cpus_per_trial: float = option(1.0, help="CPUs reserved per trial")
    gpus_per_trial: float = option(0.0, help="GPUs per trial (fractions share a GPU)")
    max_failures: int = option(2, help="retries of a failed trial")
    max_concurrent_trials: int = option(0, help="0 = as many as resources allow")
    reuse_workers: bool = option(
        True, help="run trial after trial in long-lived worker processes (off: one per trial)"
    )
    soup_accept: str = option("ge", help="greedy soup acceptance: >= or >", choices=ACCEPT)
    soup_cpus: float = option(0.0, help="CPUs reserved for the soup actor")
    soup_gpus: float = option(0.0, help="GPU share of the soup actor (it evaluates soups)")
    soup_max_models: int = option(2, help="full models the soup actor may cache in memory")
    tune_verbose: int = option(
        0,
        help="Ray Tune's own output: 0 = only raysoup's status lines (one per change, at "
        "most every 5 s), 1 = also Tune's trial table, 2 = and every trial result",
        choices=(0, 1, 2),
    )
    soup_every_s: float = option(
        30.0,
        help="seconds between the batches of finished trials the soup actor gets (a batch is "
        "decided at once, each rank at most once); 0: every trial at once",
    )

    def validate(self) -> SweepConfig:
        """Raise ``OptionsError`` naming the first impossible value; return self."""
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise OptionsError(f"name={self.name!r}: expected a plain folder name")
        for name in ("test_envs", "trial_seeds", "inits", "aux_datasets"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise OptionsError(f"{name}={values}: contains duplicates")
        if self.dataset is None:  # an auxiliary pool only
            if not self.aux_datasets:
                raise OptionsError(
                    "dataset is null (an auxiliary pool only) but aux_datasets is empty: "
                    "the sweep would run nothing"
                )
            if self.aux_pool is not None:
                raise OptionsError(
                    f"aux_pool={str(self.aux_pool)!r} with dataset null: a pool trains its "
                    f"own auxiliary runs; aux_pool is for target sweeps"
                )
        self._validate_aux()
        if self.dataset is not None:
            self._validate_target()
        if self.arch is not None:
            try:
                check_arch(self.arch)
            except ValueError as error:
                raise OptionsError(f"arch: {error}") from None
            if self.arch.startswith("timm:") and self.pretrained_weights is None:
                raise OptionsError(
                    f"arch {self.arch!r} needs pretrained_weights: runs never download. Fetch "
                    f"them once on the driver into shared storage (`raysoup fetch-weights "
                    f"{self.arch} DIR`), or point at a save_pretrained folder, a Hugging "
                    f"Face cache entry or a weights file"
                )
        if self.pretrained_weights is not None and not Path(self.pretrained_weights).exists():
            raise OptionsError(f"pretrained_weights={str(self.pretrained_weights)!r}: not found")
        for name in ("steps", "aux_steps", "lp_stage_steps", "checkpoint_freq", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionsError(f"{name}={value}: expected a positive integer")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise OptionsError(
                f"cpus_per_trial={self.cpus_per_trial}, gpus_per_trial={self.gpus_per_trial}: "
                f"expected CPUs > 0 and GPUs >= 0"
            )
        if self.fusing_range < 0:
            raise OptionsError(f"fusing_range={self.fusing_range}: expected >= 0")
        if not 0 < self.holdout_fraction < 1:
            raise OptionsError(f"holdout_fraction={self.holdout_fraction}: expected (0, 1)")
        if self.soup_cpus < 0 or self.soup_gpus < 0 or self.soup_max_models < 0:
            raise OptionsError(
                f"soup_cpus={self.soup_cpus}, soup_gpus={self.soup_gpus}, "
                f"soup_max_models={self.soup_max_models}: expected values >= 0"
            )
        if not self.soup_every_s >= 0:  # NaN too
            raise OptionsError(f"soup_every_s={self.soup_every_s}: expected seconds >= 0")
        if self.max_failures < 0 or self.max_concurrent_trials < 0:
            raise OptionsError("max_failures and max_concurrent_trials must be >= 0")
        for name, choices in (("target_keep", KEEP), ("eval_schedule", EVAL_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise OptionsError(
                    f"{name}={getattr(self, name)!r}: expected one of {list(choices)}"
                )
        for dataset in [self.dataset, *self.aux_datasets]:
            if dataset is not None:
                self._validate_hparams(dataset)
        return self

    def _validate_target(self) -> None:
        assert self.dataset is not None
        try:
            target = dataset_class(self.dataset)
        except ValueError as error:
            raise OptionsError(f"dataset: {error}") from None
        n_envs = len(target.ENVIRONMENTS)
        if not self.test_envs:
            raise OptionsError("test_envs is empty: the sweep would run no target trial")
        for env in self.test_envs:
            if not 0 <= env < n_envs:
                raise OptionsError(
                    f"test_envs: {env} is out of range for {self.dataset} "
                    f"({n_envs} envs {target.ENVIRONMENTS}: expected 0..{n_envs - 1})"
                )
        if not self.trial_seeds:
            raise OptionsError("trial_seeds is empty: the sweep would run no target trial")
        if any(seed < 0 for seed in self.trial_seeds):
            raise OptionsError(f"trial_seeds={self.trial_seeds}: seeds must be >= 0")
        if self.n_hparams < 1:
            raise OptionsError(f"n_hparams={self.n_hparams}: expected at least 1")
        if not self.inits:
            raise OptionsError("inits is empty: the sweep would run no target trial")
        for init in self.inits:
            if init not in INITS:
                raise OptionsError(f"inits: unknown init {init!r}; expected {INITS}")
        if self.dataset in self.aux_datasets:
            raise OptionsError(
                f"aux_datasets contains the target dataset {self.dataset!r}: its auxiliary "
                f"runs would train on the held-out test env"
            )
        if set(self.inits) - {"pretrained"} and not (self.aux_datasets or self.aux_dirs):
            raise OptionsError(
                f"inits {self.inits} need auxiliary checkpoints: set aux_datasets or aux_dirs"
            )
        for folder in self.aux_dirs:
            if not storage.is_dir(folder):
                raise OptionsError(f"aux_dirs: {folder!r} is not a folder")
        if not target.IS_BUILTIN and self.data_dir is None:
            raise OptionsError(f"dataset {self.dataset!r} is read from disk: set data_dir")
        if self.aux_pool is not None:
            check_aux_pool_location(self.aux_pool)
        uses_pool = bool(set(self.inits) - {"pretrained"})
        for aux in self.aux_datasets if uses_pool and self.arch is None else []:
            cls = dataset_class(aux)  # known: checked by _validate_aux
            if cls.DEFAULT_ARCH != target.DEFAULT_ARCH:
                raise OptionsError(
                    f"aux dataset {aux!r} trains a {cls.DEFAULT_ARCH} but target "
                    f"{self.dataset!r} a {target.DEFAULT_ARCH}: auxiliary featurizers must "
                    f"fit the target network (pick datasets of one kind, or set arch)"
                )

    def _validate_hparams(self, dataset: str) -> None:
        """Overrides must name known hyperparameters and keep their defaults' types."""
        defaults = sample_hparams(
            dataset,
            0,
            registry=self.hparams_registry,
            small_images=dataset_class(dataset).SMALL_IMAGES,
        )
        unknown = sorted(set(self.hparams) - set(defaults))
        if unknown:
            raise OptionsError(
                f"hparams: unknown hyperparameter(s) {unknown}; known: {sorted(defaults)}"
            )
        for name, value in self.hparams.items():
            default = defaults[name]
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok:
                kind = {bool: "true or false", int: "a positive integer"}.get(
                    type(default), "a number"
                )
                raise OptionsError(f"hparams: {name}={value!r}: expected {kind}")

    def _validate_aux(self) -> None:
        for aux in self.aux_datasets:
            try:
                cls = dataset_class(aux)
            except ValueError as error:
                raise OptionsError(f"aux_datasets: {error}") from None
            if not cls.IS_BUILTIN and self.data_dir is None:
                raise OptionsError(f"aux dataset {aux!r} is read from disk: set data_dir")
        if self.aux_datasets and self.aux_n_hparams < 1:
            raise OptionsError(f"aux_n_hparams={self.aux_n_hparams}: expected at least 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (paths as strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def fingerprint(self) -> str:
        """Identity of what the sweep computes: two configs with the same one are the same."""
        values = self.to_dict()
        for knob in RUN_KNOBS:  # how it runs, not what it computes
            values.pop(knob)
        # Options added later drop out at the value that computes what sweeps recorded
        # before them computed, so those sweeps still resume (see adopt_record).
        for late, before in ADDED_LATER.items():
            if values.get(late) == before:
                values.pop(late)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def adopt_record(
    config: SweepConfig, recorded: dict[str, Any]
) -> tuple[SweepConfig, dict[str, Any]]:
    """The config to resume a sweep recorded before ``RECORD_VERSION`` 2 with, and what
    was adopted from the record (option -> value).

    Such a record (``recorded``: its ``config``) lacks the options added since, and it
    was made when some defaults were different. An option at its default here takes the
    value that reproduces the recorded sweep: the earlier behaviour for an option it
    lacks (``ADDED_LATER``), its recorded value where it holds the earlier default
    (``EARLIER_DEFAULTS``). An option set to anything else is left alone, so a config
    that really differs is still refused by the fingerprint. A config that sets such an
    option to its new default explicitly cannot be told apart: it resumes the old way.
    """
    defaults = SweepConfig()
    adopted: dict[str, Any] = {}
    for name, before in ADDED_LATER.items():
        if name not in recorded and getattr(config, name) == getattr(defaults, name):
            adopted[name] = before
    for name, earlier in EARLIER_DEFAULTS.items():
        if recorded.get(name) == earlier and getattr(config, name) == getattr(defaults, name):
            adopted[name] = earlier
    adopted = {k: v for k, v in adopted.items() if getattr(config, k) != v}
    return dataclasses.replace(config, **adopted), adopted


def parse_record(raw: bytes, where: str) -> dict[str, Any]:
    """A sweep record (``sweep.json``) from its bytes; a damaged one is an ``OptionsError``
    that says how to recover (finished runs live in their checkpoints, not in it)."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        record = error
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        why = record if isinstance(record, Exception) else "no 'config' object"
        raise OptionsError(
            f"{where} is corrupt ({why}). It records the config the sweep was started with; "
            f"finished runs are safe in their checkpoints. Delete {where} and run the same "
            f"command with the sweep's original config to resume (a different config would "
            f"mix runs), or start afresh with another --name."
        )
    version = record.get("version", 1)
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise OptionsError(
            f"{where}: record version {version!r}, this raysoup knows versions up to "
            f"{RECORD_VERSION}: resume it with the (newer) raysoup that started it"
        )
    return record


def config_from_record(record: dict[str, Any], where: str = "sweep.json") -> SweepConfig:
    """The config a sweep record (``sweep.json``) describes; a record made before
    ``RECORD_VERSION`` 2 gets the earlier behaviour of the options it lacks."""
    values = dict(record["config"])
    if record.get("version", 1) < RECORD_VERSION:
        for name, before in ADDED_LATER.items():
            values.setdefault(name, before)
    return from_mapping(SweepConfig, values, where)


# The built-in quickstart (no config file): the nuisance benchmark, where soups pay, at a
# first look's size: one test env (2, the tuning case of experiments/bench/
# soup_regimes.py), 4 hparams seeds (the 3 auxiliary datasets + 1, so ratatouille's
# reference choice uses each auxiliary dataset) and one auxiliary run per auxiliary
# dataset instead of the reference's 4. A config file starts from SweepConfig's defaults.
QUICKSTART: dict[str, Any] = {
    "dataset": NUISANCE_TARGET,
    "test_envs": [2],
    "aux_datasets": list(NUISANCE_AUXILIARY),
    "n_hparams": 4,
    "aux_n_hparams": 1,
}


def load_config(path: str | Path | None, **overrides: Any) -> SweepConfig:
    """The config in YAML file ``path`` (the built-in quickstart, ``SweepConfig``'s
    defaults with ``QUICKSTART`` on top, when ``None``), validated."""
    data: dict[str, Any] = dict(QUICKSTART)
    where = "quickstart config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise OptionsError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise OptionsError(f"{path}: not valid YAML ({error})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise OptionsError(f"{path}: expected a mapping of options at the top level")
        data = loaded
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(SweepConfig, data, where).validate()
