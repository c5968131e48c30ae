"""Image helpers: [-1, 1] floats to uint8 NHWC, and class-row grids (optionally labelled) saved as PNG."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


def label_rows(img: np.ndarray, names: list[str], pad: int) -> np.ndarray:
    """The grid `img` (HWC, len(names) rows of equal height, `pad` pixels around each) with each row's name written
    left of it, in white, in PIL's default font."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), name, font=font) for name in names]
    width = max(b[2] for b in boxes) + 2 * pad + 2
    row_h = (img.shape[0] - pad) / len(names)
    canvas = Image.new("L", (width, img.shape[0]))
    draw = ImageDraw.Draw(canvas)
    for i, (name, box) in enumerate(zip(names, boxes)):
        top = pad + i * row_h + (row_h - pad - (box[3] - box[1])) / 2 - box[1]
        draw.text((width - pad - 2 - box[2], top), name, fill=255, font=font)
    text = np.asarray(canvas)[..., None].repeat(img.shape[2], axis=2)
    return np.concatenate([text, img], axis=1)


def save_class_grid(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    path: str | os.PathLike,
    per_row: int = 10,
    class_names: list[str] | None = None,
) -> None:
    """grid.png: one row per class, the first `per_row` samples of that class; with `class_names`, each row's class
    name is written left of it (the folder names of dataset=folder, say which row is which)."""
    rows, pad, scale = class_rows(images, labels, num_classes, per_row), 2, 2
    img = grid(rows, pad=pad, scale=scale)
    if class_names:
        present = [class_names[c] for c in range(num_classes) if (labels == c).any()]
        img = label_rows(img, present, pad * scale)
    save_png(img, path)
