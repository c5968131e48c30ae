"""The results row of a sampling run, in one place: its schema (`ROW`: each column's name, meaning, and where it is
shown), the filling of a run's row (`fill`: what was drawn, counted and timed, and what the judges say) and its
metrics.json. sample.py writes the row; the report (guidelab.report) reads it back into results.csv and results.md.

Adding a column is one `Column` in ROW plus the code that measures it in `fill`; docs/outputs.md's table is printed
from ROW (`python -m guidelab.results`) and tests/test_docs.py checks that the page shows exactly that table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from guidelab import measured, sampling
from guidelab.conditions import ATTRIBUTES, asked
from guidelab.drawing import Drawn, flops_per_sample
from guidelab.files import atomic_text
from guidelab.guidance import GuidanceSpec
from guidelab.knn import knn_judge
from guidelab.losses import trained_guidance
from guidelab.metrics import EvaluatorFeatures, class_accuracy, evaluate_samples, extract, fid
from guidelab.networks import Judge, Networks


class Column(NamedTuple):
    """One field of the results row: sample.py fills it (metrics.json), the report reads it (results.csv, .md)."""

    name: str  # its key in the row and in metrics.json
    doc: str  # what it holds (docs/outputs.md's table shows this text)
    header: str | None = ""  # its results.csv / results.md header: "" = the name, None = not in the tables
    md: bool = False  # also in results.md (where some row has a value)
    json: bool = True  # written to metrics.json by sample.py (False: filled in by the report)
    option: bool = False  # a guidance mode's key of this name fills the column instead of `options`


# The results row, defined once: adding a column is one line here (plus the code that measures it, in `fill`).
MIN_BIN = 10  # fewer matched samples than this: no fid_bin (a covariance of fewer points means nothing)
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
    Column(
        "trained",
        "what the guided UNet's one pass was trained to be beside L_simple (train.guidance_free): mg w=W (model "
        "guidance at train.mg_w = W: CFG at s = 1 / (1 - W)) or gft; empty for L_simple",
        md=True,
    ),
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
    Column(
        "request",
        "the fields asked of every sample (label and the measured attributes), then each field of the NOT after a '-'",
        md=True,
    ),
    *(
        Column(f"{a}_{kind}", doc, md=True)
        for a in ATTRIBUTES
        for kind, doc in (
            (
                "mae",
                f"mean absolute error between the {a} requested and the {a} measured on the image (guidelab.morpho)",
            ),
            ("slope", f"least-squares slope of the measured {a} against the requested one (1 = followed)"),
        )
    ),
    Column(
        "joint_success",
        "share of samples that meet every attribute asked within guidelab.measured.TOLERANCE and, where the label is "
        "asked, are read as it by the primary evaluator",
        md=True,
    ),
    Column(
        "fid_bin",
        "FID in the primary evaluator's features against real training digits of each sample's requested class and "
        "attribute bin (within guidelab.measured.TOLERANCE of every attribute asked; one real image per sample, "
        f"without replacement while the bin lasts); samples of an empty bin are left out; empty under {MIN_BIN} "
        "samples",
        md=True,
    ),
    Column(
        "free_spread", "SD of the attributes left free over their SD in the training data (collapse: << 1)", md=True
    ),
    Column("num_samples", "samples in the set"),
    Column("seconds", "wall seconds of the sampling loop (all ranks)"),
    Column("seconds_per_sample", "seconds / num_samples", md=True),
    Column(
        "gflops_per_sample",
        "GFLOPs per sample, forward and backward passes (torch.utils.flop_counter), counted on a separate run of 4 "
        "samples through the same guidance and sampler",
        md=True,
    ),
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
        raise KeyError(f"{unknown} are not columns of the results row (guidelab.results.ROW)")
    row = dict.fromkeys(COLUMNS) | values
    rest = {}
    for key, value in (options or {}).items():
        if key in COLUMNS and COLUMNS[key].option:
            row[key] = value
        else:
            rest[key] = value
    row["options"] = " ".join(f"{k}={v}" for k, v in rest.items()) or None
    return row


def doc_table() -> str:
    """The results row as docs/outputs.md shows it: one markdown line per column, where it appears, what it holds."""
    lines = ["| column | csv / md | what |", "|---|---|---|"]
    for c in ROW:
        name = f"`{c.name}`" + (f" (header `{c.header}`)" if c.header else "")
        where = "json only" if c.header is None else "csv, md" if c.md else "csv"
        lines.append(f"| {name} | {where} | {c.doc} |")
    return "\n".join(lines)


def trained_label(config: dict) -> str | None:
    """The `trained` column for a checkpoint's embedded config: None for L_simple, "mg w=W" for model guidance at
    train.mg_w = W (its one pass is CFG at s = 1 / (1 - W)), "gft" for guidance-free training. It keeps a
    model-guidance network's guidance=none rows apart from a plain network's in a merged report."""
    kind, _ = trained_guidance(config)
    return None if kind == "none" else f"mg w={float(config['train']['mg_w']):g}" if kind == "mg" else kind


def run_columns(cfg, spec: GuidanceSpec, nets: Networks, drawn: Drawn) -> dict:
    """The columns of what was drawn: guidance, sampler, the networks used, and what drawing cost (NFE counted per
    sample, seconds, the classifier's share of them)."""
    n, counts = len(drawn.labels), drawn.counts
    own = sampling.SAMPLERS.own(cfg.sampler)
    defaults = {k: p.default for k, p in sampling.SAMPLERS.get_entry(cfg.sampler.name).params.items()}
    classifier_seconds = None if nets.classifier is None else sum(c["classifier_seconds"] for c in counts)
    guide_acc = {
        k[len("test_acc_") :] or "clean": v for k, v in nets.classifier_metrics.items() if k.startswith("test_acc")
    }
    return {
        **spec.row(nets.paths.get("guide_ckpt")),
        "sampler": cfg.sampler.name,
        "sampler_options": " ".join(f"{k}={v}" for k, v in own.items() if v != defaults[k]) or None,
        "spacing": cfg.sampler.spacing,
        "steps": cfg.sampler.steps,
        **{k: sum(c[k] for c in counts) / n for k in ("nfe", "classifier_nfe")},
        "num_samples": n,
        "seconds": drawn.seconds,
        "seconds_per_sample": drawn.seconds / n,
        "seed": cfg.seed,
        "classifier_share": None if classifier_seconds is None else classifier_seconds / (drawn.seconds * len(counts)),
        "p_uncond": nets.train_config["model"].get("p_uncond"),
        "trained": trained_label(nets.train_config),
        "ckpt": nets.paths["ckpt"],
        "classifier": Path(nets.paths["classifier_ckpt"]).parts[-3] if "classifier_ckpt" in nets.paths else None,
        "classifier_test_acc": guide_acc or None,
    }


def judged(cfg, nets: Networks, judge: Judge, drawn: Drawn, device: torch.device) -> dict:
    """One evaluator's verdict, its keys suffixed as its columns are ("" primary, "_2" the second opinion): its name
    and held-out accuracy, and its accuracy on the samples (with eval=true also FID, IS, precision and recall: in the
    configured features for the primary, in its own for the second)."""
    images, labels = drawn.images, drawn.labels
    if cfg.eval.enabled:
        features = cfg.metrics.features if judge.primary else "evaluator"
        dataset = nets.train_config["dataset"]
        scores = evaluate_samples(images, labels, cfg.metrics, dataset, judge.net, judge.path, device, features)
    else:
        scores = class_accuracy(extract(EvaluatorFeatures(judge.net), images, device).logits, labels)
    s = judge.suffix
    named = {f"evaluator{s}": judge.name, f"evaluator{s}_test_acc": judge.metrics.get("test_acc")}  # the judge's own
    return named | {f"{k}{s}": v for k, v in scores.items()}  # held-out accuracy on real data, then its verdict


def fill(cfg, spec: GuidanceSpec, nets: Networks, drawn: Drawn, device: torch.device) -> tuple[dict, dict]:
    """The run's results row (ROW) and the judges' details that are no column (per-class accuracy, the reference set
    used, the k-NN judge's k and cache): what metrics.json holds. The judges are the evaluators asked for and, beside
    them, the k-NN vote among the real training images (eval.knn_k; no weights, so no gradient reaches it); last, the
    FLOPs of one sample, counted on a separate run (its NFE and seconds are not the row's)."""
    values, details = run_columns(cfg, spec, nets, drawn), {}
    verdicts = [judged(cfg, nets, judge, drawn, device) for judge in nets.judges]  # the primary, then the second
    if nets.judges and cfg.eval.knn_k:
        data = nets.train_config["dataset"]  # a diffusers model may name none: the judges' own data then
        data = data if data.get("name") else nets.judges[0].config["dataset"]
        verdicts.append(knn_judge(drawn.images, drawn.labels, data, cfg.eval.knn_k, cfg.metrics.cache_dir, device))
    for verdict in verdicts:
        for k, v in verdict.items():
            (values if k in COLUMNS else details)[k] = v
    if len(nets.judges) == 2:
        values["disagreement"] = values["accuracy"] - values["accuracy_2"]
    if drawn.request[0] is not None and drawn.request[0].dim() == 2:  # a conditioned request: read back on the image
        columns_, details["attributes"] = attribute_verdict(nets, drawn, device)
        values |= columns_
        if cfg.eval.enabled and nets.judges:
            values["fid_bin"], details["fid_bin_reference"] = bin_fid(nets, drawn, device)
    row = make_row(**values)
    row["gflops_per_sample"] = flops_per_sample(cfg, spec, nets, drawn.request, device) / 1e9
    return row, details


def attribute_verdict(nets: Networks, drawn: Drawn, device: torch.device) -> tuple[dict, dict]:
    """`measured.verdict` of a conditioned run: the training data's attribute statistics from the UNet's checkpoint
    (or the regressor's), the class read by the primary evaluator; with no label asked, no accuracy is reported (every
    judge would be scored against the null class)."""
    y, negative = drawn.request
    null = nets.num_classes
    stats = nets.train_config["data_info"].get("attributes")
    if stats is None and getattr(nets, "regressor", None) is not None:
        stats = nets.regressor_config.get("data_info", {}).get("attributes")
    primary = next((j for j in nets.judges if j.primary), None)
    predicted = None
    if primary is not None:
        predicted = extract(EvaluatorFeatures(primary.net), drawn.images, device).logits.argmax(1).cpu().numpy()
    cols, details = measured.verdict(drawn.images, y, null, stats, predicted)
    if negative is not None:
        cols["request"] = " ".join([*cols["request"].split(), *(f"-{f}" for f in asked(negative, null))])
    if "label" not in asked(y, null):
        cols |= dict.fromkeys(("accuracy", "accuracy_2", "accuracy_knn", "disagreement"))
    return cols, details


def bin_fid(nets: Networks, drawn: Drawn, device: torch.device) -> tuple[float | None, dict]:
    """The `fid_bin` column and its details: the samples' FID (primary evaluator's features) against a reference set
    of real training digits matched to the requests one for one (`measured.matched_reference`), the measured
    attributes of the training split read from the cache that training wrote (guidelab.attributes.measured). How many
    samples had a bin with real digits, and how many distinct real digits served, go into the details."""
    from guidelab.attributes import measured as measured_attributes
    from guidelab.data import load_from_config
    from guidelab.images import to_uint8

    dataset = nets.train_config["dataset"]
    data = load_from_config(dataset, "train")
    values = measured_attributes(data, dataset, "train").numpy()
    index = measured.matched_reference(drawn.request[0], nets.num_classes, data.labels.numpy(), values)
    found = index >= 0
    details = {"samples": int(found.sum()), "distinct_real": len(set(index[found].tolist())), "split": "train"}
    if found.sum() < MIN_BIN:
        return None, details
    judge = EvaluatorFeatures(next(j for j in nets.judges if j.primary).net)
    fake = extract(judge, drawn.images[found], device).features
    real = extract(judge, to_uint8(data.images[index[found]]), device).features
    return fid(real, fake), details


def write_metrics(path: Path, row: dict, details: dict) -> None:
    """metrics.json: the row's metrics.json columns, then the details."""
    atomic_text(path, json.dumps({k: v for k, v in row.items() if COLUMNS[k].json} | details, indent=2) + "\n")


def summary(row: dict) -> str:
    """The row's headline numbers for the console: fid, is, precision, recall, accuracy, and for an attribute request
    each attribute's MAE and the joint success, where measured."""
    maes = [f"{a}_mae" for a in ATTRIBUTES]
    keys = ("fid", "is", "precision", "recall", "accuracy", *maes, "joint_success")
    shown = {k: row[k] for k in keys if row.get(k) is not None}
    return "".join(f"; {k} {v:.3f}" for k, v in shown.items())


if __name__ == "__main__":  # python -m guidelab.results: the table of docs/outputs.md's "The results row"
    print(doc_table())
