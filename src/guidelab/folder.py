"""The user image folder (`dataset=folder dataset.root=DIR`): torchvision's ImageFolder layout read with PIL, each image
resized (shorter side to `image_size`, then the centre square), decoded once into a cache, and split per class into a
training part and a seeded held-out part (the evaluators' reference set and the classifier's held-out accuracy).

Layout: DIR/<class>/<image> (subfolders of a class folder count too). The class names are the sorted names of DIR's
subfolders; an image is a file whose extension is one of torchvision's IMG_EXTENSIONS (any case); names starting with
"." (files and folders, at every level) and files directly in DIR are ignored. Any other file in a class folder, an
image PIL cannot read, a dangling symlink, a symlink loop and a folder link back to a folder that holds it are bad
input: a one-line error naming it, or with `skip_bad` skipped and counted.

Pixels: 16-bit grayscale images (PIL modes I;16*, and I, as which older Pillow opens 16-bit PNGs and which 32-bit
integer TIFFs are) keep their high byte, v8 = v16 >> 8, as Pillow itself reads 16-bit RGB and gray+alpha PNGs (PIL's
convert("L") would clip them to white); the PNG specification's rounding (W3C PNG 2003, Sec. 13.12, round(v16 / 257))
differs by at most 1. Values outside 0..65535 in mode I are refused.

Cache: the decoded uint8 pixels of the whole folder go to CACHE_DIR/<folder>-<root hash>-<size>px-c<channels>-<key>.pt
(CACHE_DIR: $GUIDELAB_DATA/folders or ~/.cache/guidelab/data/folders, so a read-only folder works and the folder stays
as it was). The key hashes every visible file's relative path, size and modification time, with the image size and
channels: a changed, added or removed file decodes the folder again, and the older entry of the same folder and size
is removed. The file is written atomically and read with torch.load(weights_only=True); one that cannot be read or
written only costs a decode. The split is drawn after the cache, so `holdout` and `split_seed` never invalidate it.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from guidelab.errors import GuidelabError, one_line
from guidelab.files import atomic_torch, key_digest

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
CACHE_VERSION = 2  # bump when the decoding changes: older cache entries are then ignored (2: 16-bit images)
LAYOUT = "one subfolder of images per class, e.g. DIR/cat/1.png, DIR/dog/2.jpg"
SKIP_HINT = "remove it, or pass dataset.skip_bad=true to skip such files"


def check_options(root: str | os.PathLike | None, image_size: int, channels: int, holdout: float) -> Path:
    """The folder's own values, checked before anything is read; returns the root as a Path."""
    if not root:
        raise GuidelabError(f"dataset=folder needs dataset.root=DIR, a folder with {LAYOUT}")
    if image_size < 1:
        raise GuidelabError(f"dataset.image_size must be a positive integer, got {image_size}; e.g. 32")
    if channels not in (1, 3):
        raise GuidelabError(f"dataset.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if not 0 < holdout < 1:
        raise GuidelabError(
            f"dataset.holdout must be in (0, 1), got {holdout:g}; it is the share of each class held out for "
            "evaluation, e.g. dataset.holdout=0.1"
        )
    return Path(root).expanduser()


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _scandir(path: Path) -> list[os.DirEntry]:
    """The visible entries of a directory, sorted by name; an unreadable directory is a one-line error."""
    try:
        with os.scandir(path) as it:
            return _visible(it)
    except OSError as e:
        raise GuidelabError(
            f"cannot read the folder {path} ({e.strerror or type(e).__name__}); make it readable or pass another "
            "dataset.root"
        ) from None


def class_names(root: Path) -> list[str]:
    """The sorted names of root's visible subfolders (the classes); a missing root or one without subfolders is a
    one-line error naming it."""
    if not root.exists():
        raise GuidelabError(f"dataset.root {root} does not exist; pass dataset.root=DIR, a folder with {LAYOUT}")
    if not root.is_dir():
        raise GuidelabError(f"dataset.root {root} is not a directory; pass a folder with {LAYOUT}")
    names = [e.name for e in _scandir(root) if e.is_dir()]
    if not names:
        raise GuidelabError(f"{root} holds no class folders; put the images of each class in a subfolder ({LAYOUT})")
    return names


def _unreadable(path: Path, e: OSError) -> str:
    """Why a file or link under a class folder cannot be read, for the bad-file list (a one-line message)."""
    if e.errno == errno.ELOOP:
        return f"{path} is a symlink loop ({e.strerror}); remove the link, or pass dataset.skip_bad=true to skip it"
    if isinstance(e, FileNotFoundError) and path.is_symlink():
        return (
            f"{path} is a dangling symlink (to {os.readlink(path)}, which does not exist); point it at an image or "
            f"{SKIP_HINT}"
        )
    return f"cannot read {path} ({e.strerror or type(e).__name__}); {SKIP_HINT}"


def scan(root: Path) -> tuple[list[str], list[tuple[str, int]], list[str], list[tuple[str, int, int]]]:
    """The folder's classes, its images as (relative path, class index), one message per bad file (not an image; a
    dangling symlink, a symlink loop, a folder link back to a folder that holds it) and the (relative path, size,
    mtime_ns) of every visible file in a class folder (a broken link: size -1, the link's own mtime): what the cache
    key hashes. A folder is walked once per path from its class folder, never into a folder it is inside of."""
    names, images, bad, stats = class_names(root), [], [], []
    for label, name in enumerate(names):
        found, todo = 0, [(root / name, frozenset({_inode(root)}))]
        while todo:
            folder, above = todo.pop()
            above = above | {_inode(folder)}
            for entry in _scandir(folder):
                path, rel = Path(entry.path), str(Path(entry.path).relative_to(root))
                try:
                    st = entry.stat()  # follows links: a dangling one raises FileNotFoundError, a loop ELOOP
                except OSError as e:
                    bad.append(_unreadable(path, e))
                    stats.append((rel, -1, entry.stat(follow_symlinks=False).st_mtime_ns))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in above:
                        bad.append(_unreadable(path, OSError(errno.ELOOP, f"it leads back to {path.resolve()}")))
                        stats.append((rel, -1, entry.stat(follow_symlinks=False).st_mtime_ns))
                    else:
                        todo.append((path, above))
                    continue
                stats.append((rel, st.st_size, st.st_mtime_ns))
                if entry.name.lower().endswith(IMG_EXTENSIONS):
                    images.append((rel, label))
                    found += 1
                else:
                    bad.append(f"{path} is not an image (images end in {', '.join(IMG_EXTENSIONS)}); {SKIP_HINT}")
        if not found:
            raise GuidelabError(
                f"class folder {root / name} holds no images ({', '.join(IMG_EXTENSIONS)}); add images or remove "
                "the folder"
            )
    return names, sorted(images), sorted(bad), sorted(stats)


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _key(names: list[str], stats: list, image_size: int, channels: int) -> str:
    key = {"version": CACHE_VERSION, "image_size": image_size, "channels": channels, "classes": names, "files": stats}
    return key_digest(key, 24)


def fingerprint(root: Path, image_size: int, channels: int) -> str:
    """The cache key: a hash of every visible file (relative path, size, mtime) and of how the images are decoded
    (stat calls only, no image is opened)."""
    names, _, _, stats = scan(root)
    return _key(names, stats, image_size, channels)


def decode(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 (C, image_size, image_size): converted to L or RGB, resized so that its shorter side is
    image_size (bilinear, PIL's antialiasing), then the centre square cropped; torchvision's Resize(image_size) and
    CenterCrop(image_size) give the same pixels."""
    with Image.open(path) as img:
        img = _eight_bit(img).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if w <= h else (new_long, image_size)
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - image_size) / 2.0)), int(round((size[1] - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (mode I;16, I;16L, I;16B, I;16N or I) as mode L by its high byte, v8 = v16 >> 8 (the
    rule in the module docstring); any other image as it is."""
    if img.mode != "I" and not img.mode.startswith("I;16"):
        return img
    values = np.asarray(img, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"mode {img.mode} values {values.min()}..{values.max()} outside 0..65535: not a 16-bit image; save it "
            "as an 8- or 16-bit PNG"
        )
    return Image.fromarray((values >> 8).astype(np.uint8), mode="L")


def _decode_all(root: Path, images: list[tuple[str, int]], image_size: int, channels: int):
    """Decode every image (threads: PIL releases the GIL while decoding); returns the pixels, labels, relative paths
    of the images read, and one error message per file that could not be read."""

    def one(rel: str):
        try:
            return decode(root / rel, image_size, channels), None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            return None, f"cannot read the image {root / rel} ({type(e).__name__}: {one_line(e, 160)}); {SKIP_HINT}"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, [rel for rel, _ in images]))
    kept = [i for i, (pixels, _) in enumerate(results) if pixels is not None]
    pixels = np.stack([results[i][0] for i in kept]) if kept else np.zeros((0, channels, image_size, image_size))
    labels = torch.tensor([images[i][1] for i in kept], dtype=torch.int64)
    return torch.from_numpy(pixels.astype(np.uint8)), labels, [images[i][0] for i in kept], [e for _, e in results if e]


def _cache_prefix(root: Path, image_size: int, channels: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", root.resolve().name) or "root"
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return f"{name}-{where}-{image_size}px-c{channels}-"


def _read_cache(path: Path, key: str) -> dict | None:
    """The cache entry at `path` if it is one for `key`; None if absent, for another key, or unreadable."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file only costs a decode
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


def _write_cache(cache_dir: Path, prefix: str, entry: dict) -> None:
    """Save the entry atomically and remove the older entries of the same folder, size and channels; a cache dir that
    cannot be written only costs a decode next time."""
    path = cache_dir / f"{prefix}{entry['key']}.pt"
    try:
        atomic_torch(entry, path)
        for old in cache_dir.glob("*.pt"):
            if old.name.startswith(prefix) and old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        print(f"note: could not write the decoded-folder cache {path} ({e.strerror or e}); the next run decodes again")


def load_folder(root: Path, image_size: int, channels: int, cache_dir: Path) -> dict:
    """Every image of the folder decoded (from the cache when its key matches): {"images": uint8 (N, C, S, S),
    "labels": int64 (N,), "class_names", "paths", "bad": one error message per bad file}."""
    names, images, bad, stats = scan(root)
    key = _key(names, stats, image_size, channels)
    prefix = _cache_prefix(root, image_size, channels)
    cached = _read_cache(cache_dir / f"{prefix}{key}.pt", key)
    if cached is not None:
        return cached
    print(f"decoding {len(images)} images under {root} at {image_size}px (once: cached in {cache_dir})")
    pixels, labels, paths, unreadable = _decode_all(root, images, image_size, channels)
    entry = {"key": key, "images": pixels, "labels": labels, "class_names": names, "paths": paths}
    _write_cache(cache_dir, prefix, {**entry, "bad": bad + unreadable})
    return {**entry, "bad": bad + unreadable}


def holdout_split(labels: torch.Tensor, names: list[str], holdout: float, seed: int) -> torch.Tensor:
    """A boolean mask of the held-out images: in each class round(holdout * n) of its n images (at least 1, at most
    n - 1; none of a class with one image), drawn by a permutation seeded by `seed` and the class name, so a class's
    split does not change when another class changes."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c, name in enumerate(names):
        idx = (labels == c).nonzero().flatten()
        n = len(idx)
        k = 0 if n < 2 else min(n - 1, max(1, math.floor(holdout * n + 0.5)))
        class_seed = int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:7], "big")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(class_seed))
        held[idx[perm[:k]]] = True
    return held


def load_split(
    root: Path, train: bool, image_size: int, channels: int, skip_bad: bool, holdout: float, split_seed: int, cache
):
    """One split of the folder: uint8 (N, C, S, S) pixels, int64 labels and the class names."""
    data = load_folder(root, image_size, channels, cache)
    names, labels = list(data["class_names"]), data["labels"]
    if data["bad"]:
        if not skip_bad:
            raise GuidelabError(data["bad"][0])
        first = data["bad"][0].split(";")[0]
        print(f"dataset.skip_bad: skipped {len(data['bad'])} unreadable or non-image files under {root} ({first})")
    counts = torch.bincount(labels, minlength=len(names))
    if (counts == 0).any():
        empty = root / names[int((counts == 0).nonzero()[0])]
        raise GuidelabError(f"class folder {empty} holds no readable images; add images or remove the folder")
    held = holdout_split(labels, names, holdout, split_seed)
    if not train and not held.any():
        raise GuidelabError(
            f"{root}: every class holds a single image, so the held-out split is empty; add images (at least 2 per "
            "class)"
        )
    keep = ~held if train else held
    return data["images"][keep], labels[keep], names
