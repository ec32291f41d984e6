"""Data: multi-domain datasets (built-in and DomainBed), shifts, splits and loaders.

torchvision is imported where images are made or decoded, not with these modules: it
imports torch._dynamo (seconds), and a sweep's driver or a fresh trial worker that only
plans runs or reads a dataset's class attributes never needs it.
"""

from raysoup.data.base import DatasetError, MultiDomainDataset, TensorEnv
from raysoup.data.registry import DATASETS, dataset_class, load_dataset
from raysoup.data.splits import EnvSplit, split_envs, training_envs

__all__ = [
    "DATASETS",
    "DatasetError",
    "EnvSplit",
    "MultiDomainDataset",
    "TensorEnv",
    "dataset_class",
    "load_dataset",
    "split_envs",
    "training_envs",
]
