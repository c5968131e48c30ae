"""Collect a `sample.py -m` sweep into tables and figures, in the sweep dir:

  results.csv       one row per job: the columns of ROW below (guidance, s, w, sampler, steps, NFE, FID, IS,
                    precision, recall, the three judges' accuracies, seconds, ...), the row sample.py writes
  results.md        the same as a markdown table, naming the feature space of FID / IS / precision / recall
  plots             fid_vs_scale.png, is_vs_scale.png, fid_vs_is.png, fid_vs_accuracy.png, precision_vs_recall.png,
                    accuracy_vs_scale.png, accuracy_vs_gflops.png, accuracy_vs_seconds.png (compute per sample)
  grids             grid_<guidance>.png: rows = scales, columns = classes
  comparison.png    one row of samples per (guidance, scale), one sample per class, labelled with the accuracy

It runs by itself at the end of every `sample.py -m` sweep (a Hydra callback, configured in configs/sample.yaml), and
by hand:   python -m guidelab.report SWEEP_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from hydra.experimental.callback import Callback

from guidelab.errors import GuidelabError
from guidelab.guidance import MODES, resolve_config
from guidelab.images import class_rows, grid, save_png

MODE_ORDER = {mode: i for i, mode in enumerate(MODES)}


class Column(NamedTuple):
    """One field of the results row: sample.py fills it (metrics.json), the report reads it (results.csv, .md)."""

    name: str  # its key in the row and in metrics.json
    doc: str  # what it holds
    header: str | None = ""  # its results.csv / results.md header: "" = the name, None = not in the tables
    md: bool = False  # also in results.md (where some row has a value)
    json: bool = True  # written to metrics.json by sample.py (False: filled in by the report)
    option: bool = False  # a guidance mode's key of this name fills the column instead of `options`


# The results row, defined once: adding a column is one line here (plus the code that measures it).
ROW = (
    Column("guidance", "the guidance mode (guidance=)", md=True),
    Column(
        "base",
        "the guided prediction of the modes that have one: cond = eps(x_t, y), uncond = eps(x_t, null)",
        md=True,
        option=True,
    ),
    Column("options", "the mode's other keys, its weight schedule and its guide, as key=value", md=True),
    Column("p_uncond", "the guided UNet's label-dropout rate in training", md=True),
    Column("trained", "what its one pass was trained to be, beside L_simple: mg w=W (model guidance), gft", md=True),
    Column("classifier", "the run dir of the guidance classifier", md=True),
    Column("scale", "s (guidance scale)", header="s", md=True),
    Column("w", "Ho & Salimans' w = s - 1 where s is a CFG strength", md=True),
    Column("classifier_scale", "cfg_cg's weight of the classifier term", md=True, option=True),
    Column("sampler", "the sampler (sampler=)", md=True),
    Column("sampler_options", "the sampler's own keys not at their defaults (eta, recurrence), as key=value", md=True),
    Column("spacing", "its timestep grid", md=True),
    Column("steps", "timesteps of the grid", md=True),
    Column("nfe", "UNet evaluations per sample (the guide's included), counted", md=True),
    Column("classifier_nfe", "classifier evaluations per sample (forward + input gradient), counted", md=True),
    Column("features", "the feature space of FID / IS / precision / recall"),
    Column("fid", "FID", md=True),
    Column("is", "Inception score in the evaluator's classes", md=True),
    Column("precision", "improved precision (Kynkaanniemi et al. 2019)", md=True),
    Column("recall", "improved recall", md=True),
    Column("accuracy", "the primary evaluator's accuracy on the requested classes", md=True),
    Column("evaluator", "the primary evaluator's network"),
    Column("evaluator_test_acc", "its held-out accuracy on real data"),
    Column("fid_2", "FID in the second evaluator's features", md=True),
    Column("accuracy_2", "the second evaluator's accuracy", md=True),
    Column("evaluator_2", "the second evaluator's network"),
    Column("evaluator_2_test_acc", "its held-out accuracy on real data"),
    Column("disagreement", "accuracy - accuracy_2", md=True),
    Column("accuracy_knn", "the third judge's accuracy: a k-NN in pixel space on the real training images", md=True),
    Column("knn_test_acc", "its held-out accuracy on the real test split"),
    Column("num_samples", "samples in the set"),
    Column("seconds", "wall seconds of the sampling loop (all ranks)"),
    Column("seconds_per_sample", "seconds / num_samples", md=True),
    Column("gflops_per_sample", "GFLOPs per sample, forward and backward passes (torch.utils.flop_counter)", md=True),
    Column(
        "classifier_share",
        "share of the sampling seconds spent in the classifier's terms (forward and input "
        "gradient; cg_x0: the classifier on x0_hat and the backward pass through it and the UNet)",
        md=True,
    ),
    Column("run", "the job dir in the sweep", json=False),
    Column("seed", "the sampling seed", header=None),
    Column("ckpt", "the diffusion checkpoint", header=None),
    Column(
        "classifier_test_acc", "the guidance classifier's held-out accuracy (per quarter of t if noisy)", header=None
    ),
)
COLUMNS = {c.name: c for c in ROW}
TABLE = [c.name for c in ROW if c.header is not None]  # results.csv's columns, in order
HEADER = [c.header or c.name for c in ROW if c.header is not None]


def make_row(options: dict | None = None, **values) -> dict:
    """A results row: every column (None where not given), `options` folded in (a key of an `option` column fills it,
    the others, `seed` of a mode included, become the key=value string of `options`). Refuses a key that is not a
    column."""
    unknown = sorted(set(values) - set(COLUMNS))
    if unknown:
        raise KeyError(f"{unknown} are not columns of the results row (guidelab.report.ROW)")
    row = dict.fromkeys(COLUMNS) | values
    rest = {}
    for key, value in (options or {}).items():
        if key in COLUMNS and COLUMNS[key].option:
            row[key] = value
        else:
            rest[key] = value
    row["options"] = " ".join(f"{k}={v}" for k, v in rest.items()) or None
    return row


DISAGREE = 0.03  # rows whose two evaluators' accuracies differ by more are flagged in results.md
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


def collect(sweep_dirs: list[Path]) -> list[dict]:
    """One row per job dir of the sweeps that finished (holds samples.npz); metrics.json adds the measured columns."""
    rows = []
    for sweep_dir in sweep_dirs:
        for npz in sorted(sweep_dir.glob("*/samples.npz")):
            metrics_path = npz.parent / "metrics.json"
            if metrics_path.exists():
                try:
                    m = json.loads(metrics_path.read_text())
                except ValueError as e:
                    raise GuidelabError(f"{metrics_path} is damaged ({e}); delete it, sample its job again") from None
                row = dict.fromkeys(COLUMNS) | {k: v for k, v in m.items() if k in COLUMNS}
            else:
                row = _from_overrides(npz.parent)
            row["run"] = npz.parent.name if len(sweep_dirs) == 1 else f"{sweep_dir.name}/{npz.parent.name}"
            rows.append({**row, "dir": npz.parent, "class_names": _class_names(npz.parent)})
    if not rows:
        raise GuidelabError(
            f"no */samples.npz under {', '.join(map(str, sweep_dirs))}; pass the hydra.sweep.dir "
            "of a `sample.py -m` run"
        )
    return sorted(
        rows,
        key=lambda r: (
            MODE_ORDER.get(r["guidance"], 99),
            str(r["base"]),
            str(r["p_uncond"]),
            r["steps"] or 1e9,
            r["scale"],
        ),
    )


def _class_names(job_dir: Path) -> list[str] | None:
    """The class names the job's diffusion checkpoint recorded (its data_info: e.g. the folder names of
    dataset=folder), read memory-mapped, for results.md; None where unknown."""
    import torch
    from omegaconf import OmegaConf

    try:
        ckpt = OmegaConf.load(job_dir / ".hydra" / "config.yaml").get("ckpt")
        loaded = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        names = loaded["config"]["data_info"]["class_names"]
    except Exception:  # no checkpoint file (a diffusers model, a moved run): the table goes without names
        return None
    return [str(n) for n in names] if names else None


def _from_overrides(job_dir: Path) -> dict:
    """Without an evaluator there is no metrics.json: the row's guidance and sampler columns from the job's config."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    return make_row(
        **resolve_config(cfg).row(),
        sampler=cfg.sampler.name,
        spacing=cfg.sampler.spacing,
        steps=cfg.sampler.steps,
        seed=cfg.seed,
    )


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([HEADER] + [[_fmt(r[c]) for c in TABLE] for r in rows])


def markdown(rows: list[dict]) -> str:
    cols = [c.name for c in ROW if c.md]
    cols = [c for c in cols if any(r[c] is not None for r in rows)]
    features = sorted({r["features"] for r in rows if r["features"]})
    note = (
        f"FID / IS / precision / recall in **{', '.join(features)}** features"
        + (" (the codebase's own evaluators: not comparable with literature FIDs)" if "evaluator" in features else "")
        if features
        else "accuracy only; FID / IS / precision / recall need eval=true"
        if any(r["accuracy"] is not None for r in rows)
        else "no evaluation (run with eval=true evaluator_ckpt=PATH)"
    )
    for suffix, which in (("", "primary evaluator"), ("_2", "second evaluator (`_2` columns)")):
        judges = sorted(
            {
                (r[f"evaluator{suffix}"], r[f"evaluator{suffix}_test_acc"])
                for r in rows
                if r[f"evaluator{suffix}"] is not None
            },
            key=str,
        )
        if judges:
            note += f"; {which}: " + ", ".join(
                f"{name} (held-out accuracy on real data {_fmt(acc)})" for name, acc in judges
            )
    if knn := sorted({r["knn_test_acc"] for r in rows if r["knn_test_acc"] is not None}):
        note += f"; k-NN judge in pixel space (held-out accuracy on real data {', '.join(map(_fmt, knn))})"
    guides = {json.dumps(r["classifier_test_acc"]) for r in rows if r.get("classifier_test_acc")}
    for accs in map(json.loads, sorted(guides)):  # the guidance classifier's own held-out accuracy
        note += "; guidance classifier held-out accuracy " + ", ".join(
            f"{a:.2f}" + ("" if t == "clean" else f" at t = {t[1:]}") for t, a in accs.items()
        )
    names = {json.dumps(r["class_names"]) for r in rows if r.get("class_names")}
    for listed in map(json.loads, sorted(names)):  # what the class indices (grids, accuracy_per_class) stand for
        if listed == [str(i) for i in range(len(listed))]:
            continue  # digits: the names are the indices
        note += "; classes " + ", ".join(f"{i} {name}" for i, name in enumerate(listed))
    flagged = [r for r in rows if r["disagreement"] is not None and abs(r["disagreement"]) > DISAGREE + 1e-9]
    if any(r["disagreement"] is not None for r in rows):
        note += (
            f"; **!** marks the {len(flagged)} rows whose evaluators differ by more than {DISAGREE:.0%} in accuracy"
            if flagged
            else f"; the two evaluators agree within {DISAGREE:.0%} on every row"
        )
    table = lambda rs: (
        ["| " + " | ".join(COLUMNS[c].header or c for c in cols) + " |", "|" + "---|" * len(cols)]
        + [
            "| "
            + " | ".join(_fmt(r[c]) + (" **!**" if c == "disagreement" and r in flagged else "") for c in cols)
            + " |"
            for r in rs
        ]
    )
    lines = [note, ""] + table(rows)
    if (best := best_rows(rows)) and len(best) < len(rows):
        lines += [
            "",
            "Each series at its best scale (the highest primary-evaluator accuracy; ties: the lower FID):",
            "",
        ]
        lines += table(best)
    return "\n".join(lines)


def best_rows(rows: list[dict]) -> list[dict]:
    """Per series (see _series) the row of highest primary accuracy, ties broken by the lower FID; [] without
    accuracies."""
    scored = {k: [r for r in v if r["accuracy"] is not None] for k, v in _series(rows).items()}
    return [
        max(v, key=lambda r: (round(r["accuracy"], 6), -(r["fid"] if r["fid"] is not None else 0)))
        for v in scored.values()
        if v
    ]


SERIES_KEYS = ("base", "options", "p_uncond", "classifier", "steps", "classifier_scale", "sampler", "spacing")
SERIES_KEYS += ("sampler_options",)  # what may split one mode's rows into lines


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """One line per guidance mode on one kind of network (an MG or GFT network's rows are a mode of their own, always
    named), split further by what the sweep varies within it (CG base, p_uncond, steps, classifier scale, sampler)."""
    out: dict[str, list[dict]] = {}
    mode_of = {id(r): r["guidance"] + (f" trained={r['trained']}" if r["trained"] else "") for r in rows}
    for mode in dict.fromkeys(mode_of.values()):
        mode_rows = [r for r in rows if mode_of[id(r)] == mode]
        varying = [k for k in SERIES_KEYS if len({str(r[k]) for r in mode_rows}) > 1]
        for r in mode_rows:
            parts = [f"{k}={r[k]}" for k in varying if r[k] is not None]  # "cfg", not "cfg options=None"
            out.setdefault(" ".join([mode] + parts), []).append(r)
    return out


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
        many = len(_series(rows)) > 6  # merged reports: a wider figure, the legend beside it
        fig, ax = plt.subplots(figsize=(8.5, 4.2) if many else (5, 3.6))
        for i, (label, series) in enumerate(_series(rows).items()):
            _trace(ax, series, x, y, label, style=dict(color=plt.cm.tab20(i % 20), marker="os^vD<>"[i % 7]))
        ax.set(xlabel="s (w = s - 1)" if x == "scale" else x, ylabel=y)
        ax.set_title(title + ("" if x == "scale" else "; points labelled with s"), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, **(dict(loc="upper left", bbox_to_anchor=(1.01, 1)) if many else {}))
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)
    return written + variant_panels(rows, out_dir)


def _trace(ax, series: list[dict], x: str, y: str, label: str, style: dict) -> None:
    """One line; trade-off curves (x not the scale) follow the scale and label each point with it."""
    pts = sorted(
        ((r[x], r[y], r["scale"]) for r in series if r[x] is not None and r[y] is not None),
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
    series = {
        k: v for k, v in _series(rows).items() if any(r["fid"] is not None and r["accuracy"] is not None for r in v)
    }
    anchors = {k: v for k, v in series.items() if v[0]["guidance"] in ("cfg", "cg") and v[0]["options"] is None}
    variants: dict[str, dict[str, list[dict]]] = {}
    for k, v in series.items():  # CFG or CG with options of their own (e.g. a weight schedule) are variants too
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


def _file_name(label: str) -> str:
    """A series label as one file name: spaces to _, '=' dropped, anything else outside [A-Za-z0-9_.-] to _."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label.replace(" ", "_").replace("=", ""))


def scale_grids(rows: list[dict], out_dir: Path, per_class: int = 1) -> list[Path]:
    """grid_<series>.png per guidance series: one row per scale, one column per class."""
    written = []
    for label, series in _series(rows).items():
        lines = []
        for r in sorted(series, key=lambda r: r["scale"]):
            images, labels = _samples(r)
            lines.append(np.concatenate(class_rows(images, labels, int(labels.max()) + 1, per_class)))
        path = out_dir / f"grid_{_file_name(label)}.png"
        save_png(grid(lines, scale=2), path)
        written.append(path)
    return written


def comparison_figure(rows: list[dict], path: Path) -> None:
    """One row per (guidance, scale): the first sample of each class, labelled with mode, s and accuracy."""
    plt = _pyplot()
    label = {id(r): name for name, series in _series(rows).items() for r in series}
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


def write_report(sweep_dirs: list[Path], out_dir: Path, wandb_run=None) -> str:
    """Write every table and figure of one sweep (or several, merged) into out_dir; returns the markdown table."""
    rows, md = collect(sweep_dirs), None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "results.csv")
    (out_dir / "results.md").write_text((md := markdown(rows)) + "\n")
    figures = plots(rows, out_dir) + scale_grids(rows, out_dir)
    comparison_figure(rows, out_dir / "comparison.png")
    if wandb_run is not None:
        import wandb

        wandb_run.log(
            {
                "sweep/results": wandb.Table(columns=HEADER, data=[[_fmt(r[c]) for c in TABLE] for r in rows]),
                **{f"sweep/{p.stem}": wandb.Image(str(p)) for p in figures},
            }
        )
    return md


class SweepReport(Callback):
    """Hydra callback: after a `sample.py -m` sweep, write the report into the sweep dir."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            wandb_run = None
            if config.logger.name == "wandb":
                from guidelab.log import Logger

                wandb_run = Logger(sweep_dir, config.logger, {"sweep_dir": str(sweep_dir)}).wandb_run
            md = write_report([sweep_dir], sweep_dir, wandb_run)
            if wandb_run is not None:
                wandb_run.finish()
        except GuidelabError as e:
            print(f"error: sweep report: {e}")
            return
        print(f"\n{md}\n\nsweep report: {sweep_dir}/results.csv, results.md, *.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write results.csv, results.md and the plots of a sample.py sweep")
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="one sweep dir, or with --merge several")
    parser.add_argument("--merge", type=Path, metavar="OUT_DIR", help="merge several sweeps into OUT_DIR")
    args = parser.parse_args(argv)
    if len(args.sweep_dirs) > 1 and args.merge is None:
        raise SystemExit("error: several sweep dirs need --merge OUT_DIR (where the merged report goes)")
    out_dir = args.merge or args.sweep_dirs[0]
    try:
        md = write_report(args.sweep_dirs, out_dir)  # it makes out_dir
    except GuidelabError as e:
        raise SystemExit(f"error: {e}") from None
    print(md)
    print(f"\nwrote {out_dir}/results.csv, results.md, comparison.png and plots")


if __name__ == "__main__":
    main()
