"""A report's figures: the trade-off plots (one line per series), the per-variant FID-accuracy panels, a grid of
samples per series (rows = scales, columns = classes) and the comparison figure (one row per job)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from guidelab.images import class_rows, grid, save_png
from guidelab.report.rows import series

PLOTS = {  # file: (x, y, title)
    "fid_vs_scale.png": ("scale", "fid", "FID vs guidance scale"),
    "is_vs_scale.png": ("scale", "is", "IS vs guidance scale"),
    "accuracy_vs_scale.png": ("scale", "accuracy", "evaluator accuracy vs guidance scale"),
    "fid_vs_is.png": ("is", "fid", "FID-IS trade-off (Ho & Salimans 2022, Fig. 4)"),
    "fid_vs_accuracy.png": ("accuracy", "fid", "FID-accuracy trade-off"),
    "precision_vs_recall.png": ("recall", "precision", "precision vs recall (Dhariwal & Nichol 2021, Table 4)"),
    "accuracy_vs_gflops.png": ("gflops_per_sample", "accuracy", "accuracy vs compute per sample (GFLOPs)"),
    "accuracy_vs_seconds.png": ("seconds_per_sample", "accuracy", "accuracy vs wall seconds per sample"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    plt, written = _pyplot(), []
    for name, (x, y, title) in PLOTS.items():
        if not any(r[x] is not None and r[y] is not None for r in rows):
            continue
        many = len(series(rows)) > 6  # merged reports: a wider figure, the legend beside it
        fig, ax = plt.subplots(figsize=(8.5, 4.2) if many else (5, 3.6))
        for i, (label, line) in enumerate(series(rows).items()):
            _trace(ax, line, x, y, label, style=dict(color=plt.cm.tab20(i % 20), marker="os^vD<>"[i % 7]))
        ax.set(xlabel="s (w = s - 1)" if x == "scale" else x, ylabel=y)
        ax.set_title(title + ("" if x == "scale" else "; points labelled with s"), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, **(dict(loc="upper left", bbox_to_anchor=(1.01, 1)) if many else {}))
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)
    return written + variant_panels(rows, out_dir) + attribute_plots(rows, out_dir)


def attribute_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """<attribute>_measured_vs_requested.png for a sweep that asked for attributes: per series, the mean value
    measured on the samples (guidelab.measured) against each value requested, beside the line measured = requested."""
    plt, written = _pyplot(), []
    found = {}
    for r in rows:
        path = r["dir"] / "metrics.json" if r.get("dir") else None
        details = json.loads(path.read_text()).get("attributes", {}) if path and path.is_file() else {}
        for key, by_request in details.items():
            if key.endswith("_by_request"):
                found.setdefault(key.removesuffix("_by_request"), []).append((r, by_request))
    label = {id(r): name for name, line in series(rows).items() for r in line}
    for name, entries in found.items():
        fig, ax = plt.subplots(figsize=(5, 3.6))
        lo = min(float(v) for _, b in entries for v in b)
        hi = max(float(v) for _, b in entries for v in b)
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="measured = requested")
        for i, (r, by_request) in enumerate(entries):
            pts = sorted((float(v), m) for v, m in by_request.items() if m is not None)
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="os^vD<>"[i % 7], label=f"{label.get(id(r), r['guidance'])} s={r['scale']:g}")
        ax.set(xlabel=f"{name} requested", ylabel=f"{name} measured (guidelab.morpho)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}_measured_vs_requested.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / f"{name}_measured_vs_requested.png")
    return written


def _trace(ax, line: list[dict], x: str, y: str, label: str, style: dict) -> None:
    """One line; trade-off curves (x not the scale) follow the scale and label each point with it."""
    pts = sorted(
        ((r[x], r[y], r["scale"]) for r in line if r[x] is not None and r[y] is not None),
        key=lambda p: p[2] if x != "scale" else p[0],
    )
    if not pts:
        return
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label=label, **style)
    if x != "scale":
        for px, py, s in pts:
            ax.annotate(f"{s:g}", (px, py), fontsize=6, textcoords="offset points", xytext=(3, 3))


def variant_panels(rows: list[dict], out_dir: Path) -> list[Path]:
    """fid_vs_accuracy_panels.png: one panel per guidance variant (every mode but plain cfg and cg), each with that
    variant's FID-accuracy curve(s) against plain CFG and plain CG of the same report. Only when the report holds
    CFG or CG rows with accuracy and FID, and at least one variant."""
    plt = _pyplot()
    scored = {
        k: v for k, v in series(rows).items() if any(r["fid"] is not None and r["accuracy"] is not None for r in v)
    }
    anchors = {k: v for k, v in scored.items() if v[0]["guidance"] in ("cfg", "cg") and v[0]["options"] is None}
    variants: dict[str, dict[str, list[dict]]] = {}
    for k, v in scored.items():  # CFG or CG with options of their own (e.g. a weight schedule) are variants too
        if k not in anchors:
            mode = v[0]["guidance"]
            variants.setdefault(f"{mode} with options" if mode in ("cfg", "cg") else mode, {})[k] = v
    if not anchors or not variants:
        return []
    cols = min(3, len(variants))
    nrows = -(-len(variants) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False, sharex=True, sharey=True)
    for ax, (mode, curves) in zip(axes.flat, variants.items()):
        for k, v in anchors.items():
            _trace(
                ax,
                v,
                "accuracy",
                "fid",
                k,
                dict(color="black" if v[0]["guidance"] == "cfg" else "grey", marker="o", alpha=0.6),
            )
        for i, (k, v) in enumerate(curves.items()):
            _trace(ax, v, "accuracy", "fid", k.replace(" options=", " "), dict(color=plt.cm.tab10(i + 1), marker="s"))
        ax.set_title(mode, fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(variants) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("evaluator accuracy")
    for ax in axes[:, 0]:
        ax.set_ylabel("FID (evaluator features, log)")
    fig.suptitle(
        "FID-accuracy trade-off of each variant against plain CFG (black) and CG (grey); points labelled with s",
        fontsize=9,
    )
    fig.tight_layout()
    path = out_dir / "fid_vs_accuracy_panels.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _samples(r: dict) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(r["dir"] / "samples.npz")
    return data["images"], data["labels"]


def file_name(label: str) -> str:
    """A series label as one file name: spaces to _, '=' dropped, anything else outside [A-Za-z0-9_.-] to _."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label.replace(" ", "_").replace("=", ""))


def scale_grids(rows: list[dict], out_dir: Path, per_class: int = 1) -> list[Path]:
    """grid_<series>.png per guidance series: one row per scale, one column per class."""
    written = []
    for label, line in series(rows).items():
        lines = []
        for r in sorted(line, key=lambda r: r["scale"]):
            images, labels = _samples(r)
            lines.append(np.concatenate(class_rows(images, labels, int(labels.max()) + 1, per_class)))
        path = out_dir / f"grid_{file_name(label)}.png"
        save_png(grid(lines, scale=2), path)
        written.append(path)
    return written


def comparison_figure(rows: list[dict], path: Path) -> None:
    """One row per (guidance, scale): the first sample of each class, labelled with mode, s and accuracy."""
    plt = _pyplot()
    label = {id(r): name for name, line in series(rows).items() for r in line}
    strips = []
    for r in rows:
        images, labels = _samples(r)
        strips.append(grid([np.concatenate(class_rows(images, labels, int(labels.max()) + 1, per_row=1))], pad=1))
    h, w = strips[0].shape[:2]
    longest = max(len(f"{label[id(r)]}  s={r['scale']:g}") for r in rows)
    strip_w, label_w = 6.4, max(1.6, 0.075 * longest)  # inches; the left margin holds the labels (9 pt ~ 0.075 in/char)
    fig_w = label_w + strip_w  # a longer label widens the figure, never squeezes the strips out
    fig_h = len(strips) * strip_w * h / w * 1.04 + 0.35
    fig, axes = plt.subplots(len(strips), 1, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=label_w / fig_w, right=0.99, top=1 - 0.3 / fig_h, bottom=0.01, hspace=0.08)
    for ax, img, r in zip(axes[:, 0], strips, rows):
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set(xticks=[], yticks=[])
        acc = "" if r["accuracy"] is None else f"\naccuracy {r['accuracy']:.2f}"
        ax.set_ylabel(f"{label[id(r)]}  s={r['scale']:g}{acc}", rotation=0, ha="right", va="center", fontsize=9)
    axes[0, 0].set_title("requested class: one sample each, in class order", fontsize=9)
    fig.savefig(path, dpi=150)
    plt.close(fig)
