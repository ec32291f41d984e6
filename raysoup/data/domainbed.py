"""DomainBed datasets read from disk: ``<data_dir>/<folder>/<env>/<class>/<image>``.

Folder and environment names are DomainBed's, so an existing DomainBed ``data_dir``
works as it is. Images are decoded by torchvision's ``ImageFolder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from raysoup.data.base import DatasetError, MultiDomainDataset
from raysoup.data.transforms import Preprocess, augment_transform, eval_transform


class ImageFolderDataset(MultiDomainDataset):
    """A DomainBed image dataset; subclasses give the folder and environment folders."""

    FOLDER: ClassVar[str]
    ENV_FOLDERS: ClassVar[list[str]]
    INPUT_SHAPE: ClassVar[tuple[int, int, int]] = (3, 224, 224)
    N_STEPS: ClassVar[int] = 5001

    def __init__(
        self, data_dir: str | Path, augment: bool = True, preprocess: Preprocess | None = None
    ) -> None:
        root = Path(data_dir).expanduser() / self.FOLDER
        if not root.is_dir():
            raise DatasetError(
                f"{self.NAME}: folder {root} does not exist; expected "
                f"<data_dir>/{self.FOLDER}/<env>/<class>/<image> with envs {self.ENV_FOLDERS}"
            )
        self.root = root
        self.envs = []
        classes: list[str] | None = None
        for env_folder in self.ENV_FOLDERS:
            env_root = root / env_folder
            if not env_root.is_dir():
                present = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise DatasetError(
                    f"{self.NAME}: environment folder {env_root} is missing; expected "
                    f"env folders {self.ENV_FOLDERS}, found {present}"
                )
            env_classes = sorted(p.name for p in env_root.iterdir() if p.is_dir())
            if not env_classes:
                raise DatasetError(f"{self.NAME}: environment {env_root} has no class folders")
            if classes is None:
                classes = env_classes
            elif env_classes != classes:
                missing = sorted(set(classes) - set(env_classes))
                extra = sorted(set(env_classes) - set(classes))
                raise DatasetError(
                    f"{self.NAME}: classes of {env_root} differ from {root / self.ENV_FOLDERS[0]}: "
                    f"missing {missing}, unexpected {extra}"
                )
            from torchvision.datasets import ImageFolder  # lazy: see data/__init__
            from torchvision.datasets.folder import IMG_EXTENSIONS

            try:
                env = ImageFolder(str(env_root), allow_empty=True)
            except (FileNotFoundError, OSError) as error:
                raise DatasetError(f"{self.NAME}: cannot read {env_root}: {error}") from error
            if len(env) == 0:
                raise DatasetError(
                    f"{self.NAME}: environment {env_root} holds no images "
                    f"(extensions {', '.join(IMG_EXTENSIONS)})"
                )
            self.envs.append(env)
        assert classes is not None
        if self.NUM_CLASSES and len(classes) != self.NUM_CLASSES:
            raise DatasetError(
                f"{self.NAME}: {root} has {len(classes)} classes {classes}, "
                f"expected {self.NUM_CLASSES}"
            )
        self.classes = classes
        # The model's input size and statistics (default: ImageNet's, 224 px, as DomainBed)
        preprocess = preprocess or Preprocess(size=self.INPUT_SHAPE[-1])
        self.eval_transform = eval_transform(preprocess)
        self.train_transform = augment_transform(preprocess) if augment else self.eval_transform


class VLCS(ImageFolderDataset):
    NAME = "VLCS"
    FOLDER = "VLCS"
    ENVIRONMENTS = ["C", "L", "S", "V"]
    ENV_FOLDERS = ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    NUM_CLASSES = 5
    CHECKPOINT_FREQ = 50


class PACS(ImageFolderDataset):
    NAME = "PACS"
    FOLDER = "PACS"
    ENVIRONMENTS = ["A", "C", "P", "S"]
    ENV_FOLDERS = ["art_painting", "cartoon", "photo", "sketch"]
    NUM_CLASSES = 7


class OfficeHome(ImageFolderDataset):
    NAME = "OfficeHome"
    FOLDER = "office_home"
    ENVIRONMENTS = ["A", "C", "P", "R"]
    ENV_FOLDERS = ["Art", "Clipart", "Product", "Real World"]
    NUM_CLASSES = 65


class TerraIncognita(ImageFolderDataset):
    NAME = "TerraIncognita"
    FOLDER = "terra_incognita"
    ENVIRONMENTS = ["L100", "L38", "L43", "L46"]
    ENV_FOLDERS = ["location_100", "location_38", "location_43", "location_46"]
    NUM_CLASSES = 10


class DomainNet(ImageFolderDataset):
    NAME = "DomainNet"
    FOLDER = "domain_net"
    ENVIRONMENTS = ["clip", "info", "paint", "quick", "real", "sketch"]
    ENV_FOLDERS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    NUM_CLASSES = 345
    N_STEPS = 15001
    CHECKPOINT_FREQ = 500


DOMAINBED_DATASETS: list[type[ImageFolderDataset]] = [
    VLCS,
    PACS,
    OfficeHome,
    TerraIncognita,
    DomainNet,
]
