"""Morpho-MNIST's morphometrics of a dataset's real digits (guidelab.morpho), as two markdown tables: per class, the
mean and SD of each attribute at the native size; and how precisely each attribute survives a smaller image (default
16 px, resized by guidelab.data.load_dataset's bilinear antialias): the MAE, bias and correlation of the small-image
measurement against the native one, beside the attribute's SD across digits (a precision far below the SD keeps the
attribute usable as a condition at that size).

    python scripts/morpho_stats.py                              # mnist5k's 4,500 training digits
    python scripts/morpho_stats.py --split test --limit 200 --size 16

This is a script, not `python -m guidelab.morpho`: morpho sits below data in the package's layering
(tests/test_architecture.py), and the layering test reads imports inside functions too.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from guidelab import morpho


def _measure(dataset: str, split: str, size: int | None, limit: int | None, workers: int | None):
    # imported here, not at the top: measure's spawned workers import this script again, and guidelab.data brings torch
    # (seconds per worker on a busy machine)
    from guidelab.data import load_dataset

    data = load_dataset(dataset, split, image_size=size, download=False)
    images, labels = data.images[:limit], data.labels[:limit].numpy()
    start = time.perf_counter()
    m = morpho.measure(images, workers=workers)
    return m, labels, data.class_names, images.shape[-1], len(labels) / (time.perf_counter() - start)


def per_class_table(m: dict, labels: np.ndarray, class_names: list[str]) -> list[str]:
    """One row per class (and one for all digits): n, then mean +- SD of each attribute."""
    head = " | ".join(f"{name} ({morpho.UNITS[name]})" for name in morpho.ATTRIBUTES)
    lines = [f"| class | n | {head} |", "|---|---:|" + "---:|" * len(morpho.ATTRIBUTES)]
    groups = [(name, labels == c) for c, name in enumerate(class_names)] + [("all", np.ones_like(labels, bool))]
    for name, rows in groups:
        if not rows.any():
            continue
        cells = [f"{np.nanmean(m[a][rows]):.2f} ± {np.nanstd(m[a][rows]):.2f}" for a in morpho.ATTRIBUTES]
        lines.append(f"| {name} | {int(rows.sum())} | " + " | ".join(cells) + " |")
    return lines


def precision_table(native: dict, small: dict, small_size: int, native_size: int) -> list[str]:
    """Per attribute: SD across digits at the native size, then the small size's MAE, bias and correlation against
    it, and the error left once the small size's values are recalibrated linearly (SD x sqrt(1 - correlation^2), the
    RMSE of the best linear prediction of the native value): a bias alone costs nothing a fitted scale cannot undo."""
    lines = [
        f"| attribute | unit | SD across digits ({native_size} px) | MAE {small_size} vs {native_size} px "
        f"| bias ({small_size} − {native_size}) | correlation | MAE / SD | error after linear recalibration |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for a in morpho.ATTRIBUTES:
        both = np.isfinite(native[a]) & np.isfinite(small[a])
        diff = small[a][both] - native[a][both]
        sd, mae = np.nanstd(native[a]), np.abs(diff).mean()
        corr = np.corrcoef(native[a][both], small[a][both])[0, 1]
        lines.append(
            f"| {a} | {morpho.UNITS[a]} | {sd:.3f} | {mae:.3f} | {diff.mean():+.3f} | {corr:.3f} | {mae / sd:.2f} "
            f"| {sd * np.sqrt(1 - corr**2):.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--limit", type=int, default=None, help="only the first N digits")
    parser.add_argument("--size", type=int, default=16, help="the smaller image size to compare against the native")
    parser.add_argument("--workers", type=int, default=None, help="processes (default min(2, CPUs))")
    args = parser.parse_args(argv)
    native, labels, class_names, native_size, rate = _measure(args.dataset, args.split, None, args.limit, args.workers)
    small, _, _, small_size, rate_small = _measure(args.dataset, args.split, args.size, args.limit, args.workers)
    print(f"## {args.dataset} {args.split}: {len(labels)} digits at {native_size} px (in 28-px units)\n")
    print("\n".join(per_class_table(native, labels, class_names)))
    print(f"\n## Measured at {small_size} px against {native_size} px, per attribute (28-px units)\n")
    print("\n".join(precision_table(native, small, small_size, native_size)))
    blank = int((small["area"] == 0).sum())
    print(f"\n{blank} digits have no ink at {small_size} px (left out of the comparison where NaN)")
    print(f"measured at {rate:.0f} digits/s ({native_size} px) and {rate_small:.0f} digits/s ({small_size} px)")


if __name__ == "__main__":
    main()
