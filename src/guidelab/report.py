"""Collect a `sample.py -m` sweep: one row of samples per (guidance, scale) in a comparison figure, and a table of
the evaluator accuracy.

    python -m guidelab.report SWEEP_DIR      # -> SWEEP_DIR/comparison.png, SWEEP_DIR/accuracy.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from guidelab.errors import GuidelabError

MODE_ORDER = {"none": 0, "cfg": 1, "cg": 2, "cfg_cg": 3}


def collect(sweep_dir: Path) -> list[dict]:
    """Every job dir of the sweep that holds samples.npz, with its metrics.json when there is one."""
    runs = []
    for npz in sorted(sweep_dir.glob("*/samples.npz")):
        metrics_path = npz.parent / "metrics.json"
        if not metrics_path.exists():
            raise GuidelabError(f"{npz.parent} has samples but no metrics.json; run the sweep with evaluator_ckpt=PATH")
        runs.append({**json.loads(metrics_path.read_text()), "dir": npz.parent})
    if not runs:
        raise GuidelabError(f"no */samples.npz under {sweep_dir}; pass the hydra.sweep.dir of a `sample.py -m` run")
    return sorted(runs, key=lambda r: (MODE_ORDER.get(r["guidance"], 9), r["scale"]))


def table(runs: list[dict]) -> str:
    classes = sorted({c for r in runs for c in r["accuracy_per_class"]}, key=int)
    head = "| guidance | s | w | sampler | steps | accuracy | " + " | ".join(classes) + " |"
    rule = "|" + "---|" * (6 + len(classes))
    rows = [f"| {r['guidance']} | {r['scale']:g} | {r['w']:g} | {r['sampler']} | {r['steps']} | {r['accuracy']:.3f} | "
            + " | ".join(f"{r['accuracy_per_class'][c]:.2f}" for c in classes) + " |" for r in runs]
    return "\n".join([head, rule, *rows])


def comparison_figure(runs: list[dict], path: Path) -> None:
    """One row per (guidance, scale): the first sample of each class, labelled with mode, s and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guidelab.images import class_rows, grid

    rows = []
    for r in runs:
        data = np.load(r["dir"] / "samples.npz")
        images, labels = data["images"], data["labels"]
        rows.append(grid([np.concatenate(class_rows(images, labels, int(labels.max()) + 1, per_row=1))], pad=1))
    h, w = rows[0].shape[:2]
    fig_w = 8.0
    label_w = 1.6  # inches of left margin for the row labels
    fig_h = len(rows) * (fig_w - label_w) * h / w * 1.04 + 0.35
    fig, axes = plt.subplots(len(rows), 1, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=label_w / fig_w, right=0.99, top=1 - 0.3 / fig_h, bottom=0.01, hspace=0.08)
    for ax, img, r in zip(axes[:, 0], rows, runs):
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{r['guidance']}  s={r['scale']:g}\naccuracy {r['accuracy']:.2f}", rotation=0, ha="right",
                      va="center", fontsize=9)
    axes[0, 0].set_title("requested class: one sample each, in class order", fontsize=9)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        runs = collect(args.sweep_dir)
    except GuidelabError as e:
        raise SystemExit(f"error: {e}")
    md = table(runs)
    (args.sweep_dir / "accuracy.md").write_text(md + "\n")
    comparison_figure(runs, args.sweep_dir / "comparison.png")
    print(md)
    print(f"\nwrote {args.sweep_dir / 'comparison.png'} and {args.sweep_dir / 'accuracy.md'}")


if __name__ == "__main__":
    main()
