"""Datasets by name: one explicit table, no lookup through ``globals()``."""

from __future__ import annotations

from pathlib import Path

from raysoup.data.base import DatasetError, MultiDomainDataset
from raysoup.data.builtin import BUILTIN_DATASETS
from raysoup.data.domainbed import DOMAINBED_DATASETS
from raysoup.data.nuisance import NUISANCE_DATASETS
from raysoup.data.transforms import Preprocess, batch_transform

DATASETS: dict[str, type[MultiDomainDataset]] = {
    cls.NAME: cls for cls in [*BUILTIN_DATASETS, *NUISANCE_DATASETS, *DOMAINBED_DATASETS]
}


def dataset_class(name: str) -> type[MultiDomainDataset]:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(
            f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}"
        ) from None


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    augment: bool = True,
    preprocess: Preprocess | None = None,
) -> MultiDomainDataset:
    """Build dataset ``name``; on-disk datasets need ``data_dir`` and take ``augment``
    (the built-in ones are generated, with no augmentation, as DomainBed's MNISTs).
    ``preprocess`` is the model's input size and statistics (``None``: the dataset's own
    default; the built-in images are then fed as they are)."""
    cls = dataset_class(name)
    if cls.IS_BUILTIN:
        dataset = cls()
        if preprocess is not None:
            dataset.batch_transform = batch_transform(preprocess)
        return dataset
    if data_dir is None:
        raise DatasetError(
            f"dataset {name!r} is read from disk: give --data-dir DIR holding "
            f"DIR/{getattr(cls, 'FOLDER', name)}/<env>/<class>/<image>"
        )
    return cls(data_dir, augment=augment, preprocess=preprocess)  # type: ignore[call-arg]
