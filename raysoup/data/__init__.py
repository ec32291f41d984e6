"""Data: multi-domain datasets (built-in and DomainBed), shifts, splits and loaders."""

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
