"""Data loading: CIFAR pickles in the real format, digits, image folders, batches, augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from python_models import data as D


def test_cifar10_loader_reads_generated_folder(tmp_path):
    folder = D.write_cifar(tmp_path, "cifar10", train_per_file=6, test_size=4, seed=3)
    bundle = D.load_cifar(tmp_path, "cifar10")  # the parent of cifar-10-batches-py
    assert folder.name == "cifar-10-batches-py"
    assert len(bundle.train) == 30 and len(bundle.test) == 4
    assert bundle.num_classes == 10 and bundle.pad == 4 and bundle.flip
    # Pixel layout: CIFAR rows are 1024 R, then G, then B values, each row-major 32x32.
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    image, label, _ = bundle.train[6]  # first image of data_batch_2
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image[1, 0], torch.from_numpy(raw[b"data"][0, 1024:1056]))
    assert torch.equal(image[2, 31], torch.from_numpy(raw[b"data"][0, 3072 - 32 :]))
    assert label == raw[b"labels"][0]


def test_cifar100_loader_uses_fine_labels(tmp_path):
    folder = D.write_cifar(tmp_path, "cifar100", train_per_file=7, test_size=5)
    bundle = D.load_cifar(folder, "cifar100")  # the folder itself
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert bundle.num_classes == 100
    assert bundle.train.labels.tolist() == raw[b"fine_labels"]
    assert len(bundle.test) == 5


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "expected the folder 'cifar-10-batches-py'"),
    ],
)
def test_missing_cifar_path_is_a_clear_error(tmp_path, setup, message):
    with pytest.raises(D.DatasetError, match=message):
        D.load_cifar(setup(tmp_path), "cifar10")


def test_malformed_cifar_files_are_clear_errors(tmp_path):
    folder = D.write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(D.DatasetError, match="data_batch_3 is not a CIFAR Python-pickle"):
        D.load_cifar(tmp_path, "cifar10")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(D.DatasetError, match=r"uint8 \[N, 3072\]"):
        D.load_cifar(tmp_path, "cifar10")
    D.write_cifar(tmp_path, "cifar10")  # repair the batches, then lose the test file
    (folder / "test_batch").unlink()
    with pytest.raises(D.DatasetError, match="lacks the file 'test_batch'"):
        D.load_cifar(tmp_path, "cifar10")


def test_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = D.write_cifar(tmp_path, "cifar10")
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(D.DatasetError, match="unexpected object builtins.print"):
        D.load_cifar(tmp_path, "cifar10")


def test_digits_builtin_dataset():
    bundle = D.load_digits(16)
    assert len(bundle.train) + len(bundle.test) == 1797
    assert bundle.train.images.shape[1:] == (3, 16, 16)
    assert set(bundle.test.labels.tolist()) == set(range(10))
    assert not bundle.flip  # a mirrored digit is another glyph


def test_load_dataset_needs_a_path():
    with pytest.raises(D.DatasetError, match="needs --data-dir"):
        D.load_dataset("cifar10", None)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    bundle = D.load_image_folder(tmp_path, image_size=16)
    assert bundle.num_classes == 2 and len(bundle.train) == 6 and len(bundle.test) == 4
    bundle.train.set_epoch(seed=1, epoch=0)
    a, label, index = bundle.train[4]
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8 and label == 1 and index == 4
    assert torch.equal(a, bundle.train[4][0])  # the crop is a function of (seed, epoch, index)
    bundle.train.set_epoch(seed=1, epoch=1)
    assert not torch.equal(a, bundle.train[4][0])
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(D.DatasetError, match="classes not in the training split"):
        D.load_image_folder(tmp_path, image_size=16)


def test_epoch_batches_split_global_batches_among_ranks():
    single = D.epoch_batches(23, 6, seed=5, epoch=2)
    parts = [D.epoch_batches(23, 3, rank=r, world_size=2, seed=5, epoch=2) for r in range(2)]
    assert len(single) == 3  # 23 // 6, the incomplete batch dropped
    for step, batch in enumerate(single):
        assert parts[0][step] + parts[1][step] == batch
    assert D.epoch_batches(23, 6, seed=5, epoch=3) != single  # reshuffled each epoch
    evaluation = [
        D.epoch_batches(7, 2, rank=r, world_size=2, shuffle=False, drop_last=False)
        for r in range(2)
    ]
    assert sorted(i for rank in evaluation for b in rank for i in b) == list(range(7))


def test_augmentation_crop_and_flip():
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).view(2, 1, 3, 3)
    aug = D.Augmentation(offsets=torch.tensor([[0, 0], [1, 2]]), flips=torch.tensor([False, True]))
    out = aug.apply(images, torch.tensor([0, 1]), pad=1)
    # Sample 0: window at the padded image's corner -> shifted down-right, zeros enter.
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 3, 4]]
    # Sample 1: window shifted right by one (cols 1..3 of the image padded on the right),
    # then mirrored.
    assert out[1, 0].tolist() == [[0, 11, 10], [0, 14, 13], [0, 17, 16]]
    drawn = D.Augmentation.draw(50, pad=4, flip=True, seed=0, epoch=0)
    assert drawn.offsets.min() >= 0 and drawn.offsets.max() <= 8
    assert 0 < drawn.flips.sum() < 50
    assert torch.equal(drawn.offsets, D.Augmentation.draw(50, 4, True, 0, 0).offsets)
