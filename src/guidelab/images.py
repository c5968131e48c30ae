"""Image helpers: [-1, 1] floats to uint8 NHWC, and class-row grids saved as PNG."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 (the `images` array of samples.npz)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def class_rows(images: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 10) -> list[np.ndarray]:
    """One row per class present in `labels` (in class order), up to `per_row` images each."""
    return [images[labels == c][:per_row] for c in range(num_classes) if (labels == c).any()]


def grid(rows: list[np.ndarray], pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile rows of uint8 NHWC images into one HWC image (shorter rows padded with black)."""
    h, w, c = rows[0].shape[1:]
    ncol = max(len(r) for r in rows)
    out = np.zeros((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out[pad + i * (h + pad) : pad + i * (h + pad) + h, pad + j * (w + pad) : pad + j * (w + pad) + w] = img
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def save_png(img: np.ndarray, path: str | os.PathLike) -> None:
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)


def save_class_grid(
    images: np.ndarray, labels: np.ndarray, num_classes: int, path: str | os.PathLike, per_row: int = 10
) -> None:
    """grid.png: one row per class, the first `per_row` samples of that class."""
    save_png(grid(class_rows(images, labels, num_classes, per_row), scale=2), path)
