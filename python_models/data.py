"""Datasets for training: the built-in digits, CIFAR-10/100 (Python pickles), image folders.

Everything random is a function of ``(seed, epoch, sample index)``: the shuffle, each
sample's crop offset and flip. So a resumed run sees exactly the batches and augmentations
of an uninterrupted one, and a run split over several processes sees, per step, exactly the
samples (and augmentations) one process would see in its batch, cut into consecutive parts.

Images travel as uint8 ``[N, C, H, W]``; augmentation (random crop with zero padding,
horizontal flip) and normalisation run on the training device, batch at a time.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
CIFAR_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset path is missing or its contents are not in the expected format."""


# ----------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """An in-memory dataset: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``.

    ``dataset[i]`` is ``(image, label, i)``; ``batch(indices)`` fetches many at once.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise DatasetError(
                f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}"
            )
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.images[index], int(self.labels[index]), index

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Images, labels and indices of ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[idx], self.labels[idx], idx

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Nothing to do: in-memory samples have no per-sample randomness."""


@dataclass
class DataBundle:
    """A train/test pair and what the model and the augmentation need to know about it.

    Attributes:
        name: dataset name (one of ``DATASETS``).
        train, test: the two splits.
        num_classes: number of labels.
        image_size: side of the (square) images the model sees.
        mean, std: per-channel normalisation (of values in [0, 1]).
        pad: zero padding of the random crop (0: no crop).
        flip: random horizontal flips.
        small_inputs: CIFAR-style stem (3x3 conv, no pooling) rather than ImageNet's.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool
    small_inputs: bool

    @property
    def in_channels(self) -> int:
        """Channels of the images."""
        return len(self.mean)


# ----------------------------------------------------------------------------- digits


def load_digits(image_size: int = 16, test_fraction: float = 0.2) -> DataBundle:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes): no download.

    Upsampled bilinearly to ``image_size``, replicated to 3 channels (so every model's stem
    fits), split 80/20 by a fixed permutation. Augmentation: crop with 2-pixel padding, no
    flips (a mirrored digit is another glyph).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DatasetError(
            "the built-in digits dataset needs scikit-learn: pip install scikit-learn"
        ) from exc
    digits = sk_load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(round(len(labels) * test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    train = TensorImageDataset(images[train_idx].contiguous(), labels[train_idx])
    mean, std = _channel_mean_std(train.images)
    return DataBundle(
        name="digits",
        train=train,
        test=TensorImageDataset(images[test_idx].contiguous(), labels[test_idx]),
        num_classes=10,
        image_size=image_size,
        mean=mean,
        std=std,
        pad=2,
        flip=False,
        small_inputs=True,
    )


def _channel_mean_std(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64) / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())


# ----------------------------------------------------------------------------- CIFAR

_CIFAR_LAYOUT = {
    # folder name, train files, test files, label key, number of classes
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR files hold (dicts, lists, bytes and numpy arrays).

    A pickle can run arbitrary code when loaded; restricting the classes it may name keeps a
    wrong or hostile file at ``--data-dir`` from doing so.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # any unpickling failure means: not a CIFAR file
        raise DatasetError(
            f"{path} is not a CIFAR Python-pickle batch ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(entry, dict):
        raise DatasetError(
            f"{path} is not a CIFAR batch: expected a dict, got {type(entry).__name__}"
        )
    return entry


def find_cifar_dir(root: str | os.PathLike, kind: str) -> Path:
    """The ``cifar-10-batches-py`` / ``cifar-100-python`` folder at or directly under ``root``."""
    folder, train_files, _, _, _ = _CIFAR_LAYOUT[kind]
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset path {str(root)!r} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset path {str(root)!r} is not a directory")
    for candidate in (root, root / folder):
        if (candidate / train_files[0]).is_file():
            return candidate
    raise DatasetError(
        f"no {kind} data at {str(root)!r}: expected the folder {folder!r} (with "
        f"{train_files[0]!r} ...) from the Python version of the dataset, either as that path "
        "or inside it"
    )


def _read_cifar_files(
    folder: Path, names: list[str], label_key: bytes, num_classes: int
) -> TensorImageDataset:
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"CIFAR folder {str(folder)!r} lacks the file {name!r}")
        entry = _unpickle(path)
        data, target = entry.get(b"data"), entry.get(label_key)
        if data is None or target is None:
            raise DatasetError(f"{path} lacks the {b'data'!r} or {label_key!r} entry")
        data = np.asarray(data)
        target = np.asarray(target)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(
                f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}"
            )
        if target.shape != (data.shape[0],):
            raise DatasetError(f"{path}: {data.shape[0]} images but {target.size} labels")
        if target.size and (target.min() < 0 or target.max() >= num_classes):
            raise DatasetError(f"{path}: labels outside [0, {num_classes})")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(target.astype(np.int64)))
    return TensorImageDataset(torch.cat(images), torch.cat(labels))


def load_cifar(root: str | os.PathLike, kind: str = "cifar10") -> DataBundle:
    """CIFAR-10 or CIFAR-100 from the official Python-pickle folder at (or under) ``root``.

    Augmentation as in the paper: random crop with 4-pixel padding and horizontal flips.
    """
    if kind not in _CIFAR_LAYOUT:
        raise ValueError(f"kind must be one of {tuple(_CIFAR_LAYOUT)}, got {kind!r}")
    folder = find_cifar_dir(root, kind)
    _, train_files, test_files, label_key, num_classes = _CIFAR_LAYOUT[kind]
    mean, std = CIFAR_MEAN_STD[kind]
    return DataBundle(
        name=kind,
        train=_read_cifar_files(folder, train_files, label_key, num_classes),
        test=_read_cifar_files(folder, test_files, label_key, num_classes),
        num_classes=num_classes,
        image_size=32,
        mean=mean,
        std=std,
        pad=4,
        flip=True,
        small_inputs=True,
    )


def write_cifar(
    root: str | os.PathLike,
    kind: str = "cifar10",
    train_per_file: int = 10,
    test_size: int = 10,
    seed: int = 0,
) -> Path:
    """Write a small random dataset in the exact CIFAR Python-pickle format; returns its folder.

    For tests and smoke runs: same file names, keys and dtypes as the real download.
    """
    folder_name, train_files, test_files, label_key, num_classes = _CIFAR_LAYOUT[kind]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for names, size in ((train_files, train_per_file), (test_files, test_size)):
        for name in names:
            entry = {
                b"batch_label": name.encode(),
                b"data": rng.integers(0, 256, size=(size, 3072), dtype=np.uint8),
                label_key: rng.integers(0, num_classes, size=size).tolist(),
                b"filenames": [f"{name}_{i}.png".encode() for i in range(size)],
            }
            with open(folder / name, "wb") as f:
                pickle.dump(entry, f, protocol=2)
    meta_name, meta_key = (
        ("batches.meta", b"label_names") if kind == "cifar10" else ("meta", b"fine_label_names")
    )
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class{i}".encode() for i in range(num_classes)]}, f, protocol=2)
    return folder


# ----------------------------------------------------------------------------- image folders


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` files, decoded with Pillow, as uint8 ``[3, S, S]`` tensors.

    Training: random-resized crop (scale 0.08-1, aspect 3/4-4/3) to ``image_size``.
    Evaluation: resize the short side to ``image_size * 8/7``, centre crop ``image_size``.
    The crop of sample ``i`` is drawn from ``(seed, epoch, i)`` (see ``set_epoch``).
    """

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, train: bool) -> None:
        self.samples = samples
        self.image_size = image_size
        self.train = train
        self.seed, self.epoch = 0, 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Choose the random crops of this epoch (call before iterating)."""
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[index]
        image = _open_rgb(path)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image = _random_resized_crop(image, self.image_size, rng)
        else:
            image = _center_crop(image, self.image_size)
        array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
        return torch.from_numpy(array), label, index


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from None


def _random_resized_crop(image, size: int, rng: np.random.Generator):
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return image.resize((size, size), box=(left, top, left + w, top + h))
    return _center_crop(image, size)  # the same fallback as torchvision


def _center_crop(image, size: int):
    width, height = image.size
    short = max(1, round(size * 8 / 7))
    scale = short / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))))
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _scan_split(folder: Path, classes: list[str] | None) -> tuple[list, list[str]]:
    if not folder.is_dir():
        raise DatasetError(f"image folder {str(folder)!r} does not exist")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not found:
        raise DatasetError(f"{str(folder)!r} has no class sub-folders (expected <class>/<image>)")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"{str(folder)!r} has classes not in the training split: {unknown}")
    index = {name: i for i, name in enumerate(classes)}
    samples = [
        (path, index[d])
        for d in found
        for path in sorted((folder / d).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    ]
    if not samples:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}")
    return samples, classes


def load_image_folder(root: str | os.PathLike, image_size: int = 224) -> DataBundle:
    """An ImageNet-style tree: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``.

    Normalised with ImageNet's mean and std; training flips horizontally.
    """
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise DatasetError("image folders need Pillow: pip install pillow") from exc
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset path {str(root)!r} does not exist or is not a directory")
    train_samples, classes = _scan_split(root / "train", None)
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    test_samples, _ = _scan_split(val_dir, classes)
    mean, std = IMAGENET_MEAN_STD
    return DataBundle(
        name="imagefolder",
        train=ImageFolderDataset(train_samples, image_size, train=True),
        test=ImageFolderDataset(test_samples, image_size, train=False),
        num_classes=len(classes),
        image_size=image_size,
        mean=mean,
        std=std,
        pad=0,
        flip=True,
        small_inputs=image_size < 100,
    )


def load_dataset(name: str, path: str | None = None, image_size: int | None = None) -> DataBundle:
    """The dataset ``name`` (``DATASETS``); CIFAR and image folders need ``path``."""
    if name == "digits":
        return load_digits(image_size or 16)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if not path:
        raise DatasetError(f"dataset {name!r} needs --data-dir (the folder holding it)")
    if name in _CIFAR_LAYOUT:
        return load_cifar(path, name)
    return load_image_folder(path, image_size or 224)


# ----------------------------------------------------------------------------- batches


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    # Independent, well-mixed streams for each (seed, epoch, purpose).
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def epoch_batches(
    num_samples: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> list[list[int]]:
    """This rank's sample indices for each step of ``epoch``.

    Each step takes ``batch_size * world_size`` consecutive samples of the epoch's
    permutation and gives rank ``r`` the ``r``-th consecutive part, so the ranks' batches
    concatenated in rank order are the batch one process would use. Training drops the
    final incomplete global batch; evaluation (``drop_last=False``) splits it as evenly as
    possible (a rank's part may be empty).
    """
    if shuffle:
        order = torch.randperm(num_samples, generator=_generator(seed, epoch, 0)).tolist()
    else:
        order = list(range(num_samples))
    step = batch_size * world_size
    batches = []
    for start in range(0, num_samples, step):
        chunk = order[start : start + step]
        if len(chunk) < step and drop_last:
            break
        parts = np.array_split(np.asarray(chunk, dtype=np.int64), world_size)
        batches.append(parts[rank].tolist())
    return batches


def iterate(
    dataset: Dataset, batches: list[list[int]], workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(images uint8, labels, indices)`` for each index list of ``batches``."""
    if isinstance(dataset, TensorImageDataset):
        for b in batches:
            if b:
                yield dataset.batch(b)
        return
    loader = DataLoader(
        dataset,
        batch_sampler=[b for b in batches if b],
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    yield from loader


@dataclass
class Augmentation:
    """Per-sample crop offsets and flips of one epoch, indexed by dataset index."""

    offsets: Tensor  # [N, 2] int64 in [0, 2*pad]: top-left corner in the padded image
    flips: Tensor  # [N] bool

    @classmethod
    def draw(cls, num_samples: int, pad: int, flip: bool, seed: int, epoch: int) -> Augmentation:
        """The augmentation of every sample for ``epoch`` (a function of seed and epoch)."""
        gen = _generator(seed, epoch, 1)
        offsets = torch.randint(0, 2 * pad + 1, (num_samples, 2), generator=gen)
        flips = (
            torch.rand(num_samples, generator=gen) < 0.5
            if flip
            else torch.zeros(num_samples, dtype=torch.bool)
        )
        return cls(offsets, flips)

    def apply(self, images: Tensor, indices: Tensor, pad: int) -> Tensor:
        """Crop (after zero padding by ``pad``) and flip a batch ``[B, C, H, W]``."""
        offsets = self.offsets[indices].to(images.device)
        flips = self.flips[indices].to(images.device)
        if pad:
            images = crop_padded(images, offsets, pad)
        return torch.where(flips.view(-1, 1, 1, 1), images.flip(3), images)


def crop_padded(images: Tensor, offsets: Tensor, pad: int) -> Tensor:
    """Per-sample ``H x W`` crops of ``images`` zero-padded by ``pad``, at ``offsets``."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # [B, H]
    cols = offsets[:, 1:2] + torch.arange(w, device=images.device)  # [B, W]
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    # Advanced indexing puts the indexed dims first: [B, H, W, C] -> [B, C, H, W].
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def normalize(
    images: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> Tensor:
    """uint8 images to ``(x / 255 - mean) / std`` in ``dtype``."""
    m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    return (images.to(dtype) / 255 - m) / s
