from __future__ import annotations

import pytest
import torch
from PIL import Image

from raysoup.data import DatasetError, load_dataset, shifts
from raysoup.data.builtin import BUILTIN_AUXILIARY, BUILTIN_BASE, BUILTIN_TARGET, MiniRotatedMNIST
from raysoup.data.domainbed import PACS
from raysoup.data.loaders import eval_batches, train_batches
from raysoup.data.splits import split_envs


def test_builtin_target_is_domainbed_style() -> None:
    target = load_dataset(BUILTIN_TARGET)
    assert target.ENVIRONMENTS == ["0", "15", "30", "45", "60", "75"]
    assert len(target.envs) == 6 and all(len(e) == 500 for e in target.envs)
    # interleaved: env i holds images i, i+6, i+12, ... of the target part
    assert target.envs[1].source_ids[:2] == ["mnist5k:1", "mnist5k:7"]
    x, y = target.envs[0][0]
    assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1 and 0 <= y < 10


def test_auxiliary_and_base_images_never_overlap_the_target() -> None:
    target_ids = {s for env in load_dataset(BUILTIN_TARGET).envs for s in env.source_ids}
    assert len(BUILTIN_AUXILIARY) >= 3
    label_spaces = set()
    for name in [*BUILTIN_AUXILIARY, BUILTIN_BASE]:
        ds = load_dataset(name)
        ids = {s for env in ds.envs for s in env.source_ids}
        assert not ids & target_ids, name
        label_spaces.add(ds.NUM_CLASSES)
        for env in ds.envs:
            assert int(env.labels.max()) < ds.NUM_CLASSES
    assert len(label_spaces) >= 2  # auxiliary datasets have their own label spaces


def test_shift_blocks_are_cumulative() -> None:
    images = load_dataset(BUILTIN_TARGET).envs[0].images[:20]
    labels = torch.arange(20) % 10
    assert torch.equal(shifts.rotation(images, 2), shifts.rotate(images, 60.0))
    assert torch.equal(shifts.recolour(shifts.recolour(images, 1), 1), shifts.recolour(images, 2))
    red = shifts.recolour(images, 1)
    assert torch.equal(red[:, 1:], images[:, 1:]) and (red[:, 0] >= images[:, 0]).all()
    cc = shifts.class_conditional_recolour(images, labels, 1)
    changed = (cc.int() - images.int()).abs().sum(dim=(2, 3)) > 0
    assert changed[torch.arange(20), labels % 3].any() and not changed[labels % 3 != 0, 0].any()
    flipped = shifts.label_flip(labels, 10, 1)
    assert torch.equal(flipped, 9 - labels)
    assert torch.equal(shifts.label_flip(labels, 10, 2), (9 - labels + 2) % 10)
    noisy = shifts.corruption(images, 1, 20, seed=0)
    assert torch.equal(noisy, shifts.corruption(images, 1, 20, seed=0))
    assert (noisy.int() - images.int()).abs().max() <= 20
    kept, superclasses = shifts.subpopulation(labels, [d // 2 for d in range(10)], {0, 3})
    assert set(labels[kept].tolist()) == {0, 3} and set(superclasses.tolist()) == {0, 1}
    kept = shifts.label_shift(labels.repeat(50), [1.0] + [0.0] * 9, seed=0)
    assert set(labels.repeat(50)[kept].tolist()) == {0}


def test_loaders_are_seeded_and_eval_covers_the_split() -> None:
    ds = MiniRotatedMNIST()
    split = split_envs(ds.env_sizes(), 0)[2]
    a = train_batches(ds, 2, split.in_indices, 8, seed=5)
    b = train_batches(ds, 2, split.in_indices, 8, seed=5)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    total = sum(len(y) for _, y in eval_batches(ds, 2, split.out_indices, 32))
    assert total == len(split.out_indices)


def _image_tree(root, envs, classes, per_class=3):
    for env in envs:
        for c in classes:
            folder = root / "PACS" / env / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 10), (i * 40, 10, 200)).save(folder / f"{i}.png")


def test_imagefolder_loader(tmp_path) -> None:
    _image_tree(tmp_path, PACS.ENV_FOLDERS, [f"c{i}" for i in range(7)])
    ds = load_dataset("PACS", tmp_path)
    assert ds.env_sizes() == [21] * 4 and ds.classes[0] == "c0"
    split = split_envs(ds.env_sizes(), 0)[1]
    x, y = next(train_batches(ds, 1, split.in_indices, 4, seed=0))
    assert x.shape == (4, 3, 224, 224) and y.dtype == torch.int64
    xs = [x for x, _ in eval_batches(ds, 1, split.out_indices, 2)]
    assert sum(len(x) for x in xs) == len(split.out_indices)


def test_imagefolder_errors(tmp_path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'PAC'"):
        load_dataset("PAC", tmp_path)
    with pytest.raises(DatasetError, match=r"PACS.*does not exist.*art_painting"):
        load_dataset("PACS", tmp_path)
    with pytest.raises(DatasetError, match="give --data-dir"):
        load_dataset("PACS")
    classes = [f"c{i}" for i in range(7)]
    _image_tree(tmp_path, PACS.ENV_FOLDERS[:3], classes)
    with pytest.raises(DatasetError, match=r"environment folder .*sketch is missing"):
        load_dataset("PACS", tmp_path)
    (tmp_path / "PACS" / "sketch" / "c0").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"classes of .*sketch differ.*missing \['c1'"):
        load_dataset("PACS", tmp_path)
    for c in classes[1:]:
        (tmp_path / "PACS" / "sketch" / c).mkdir()
    with pytest.raises(DatasetError, match=r"sketch holds no images"):
        load_dataset("PACS", tmp_path)
