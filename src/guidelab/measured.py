"""The judge of attribute requests: every sample measured on the image (guidelab.morpho), nothing trained, no gradient
reaches it. Per attribute asked: the mean absolute error between the value requested and the value measured, and the
slope of measured against requested (1 = the request is followed across its range, 0 = ignored); the share of samples
that meet every field of the request within the stated tolerances (joint success); and the spread of the attributes
left free, against the training data's (a collapse shows there)."""

from __future__ import annotations

import numpy as np
import torch

from guidelab.conditions import ATTRIBUTES, asked, columns, labels_of

# How close a measured value must come to the request to count as met, in the units of guidelab.morpho (pixels of a
# 28 px canvas, px^2 for the area, radians for the slant): thickness within 0.5 px is the study's goal; the others are
# about a tenth of each attribute's spread over the real digits (docs/results.md, "Attributes").
TOLERANCE = {"area": 15.0, "length": 3.0, "thickness": 0.5, "slant": 0.1, "width": 1.0, "height": 1.0}


def _mean(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def slope(requested: np.ndarray, measured: np.ndarray) -> float | None:
    """The least-squares slope of measured against requested values (None where every request is the same)."""
    ok = np.isfinite(measured)
    if ok.sum() < 2 or np.ptp(requested[ok]) == 0:
        return None
    return float(np.polyfit(requested[ok], measured[ok], 1)[0])


def verdict(
    images: np.ndarray, y: torch.Tensor, null_class: int, stats: dict | None = None, predicted: np.ndarray | None = None
) -> tuple[dict, dict]:
    """(columns, details) of a conditioned run: images uint8 NHWC, y its condition rows, `stats` the training data's
    attribute statistics (the spread of free attributes is read against their SD; None: not reported), `predicted`
    the primary evaluator's class for each sample (joint success asks the class of it where the label is asked; None:
    the attributes alone). A sample whose attribute cannot be measured (no ink) misses that attribute. The details
    hold, per attribute asked, the mean measured value for each value requested (the report plots them)."""
    from guidelab import morpho

    fields = asked(y, null_class)
    names = [f for f in fields if f != "label"]
    found = morpho.measure(images[..., 0] if images.ndim == 4 else images)
    cols, details, met = {}, {"tolerance": {}}, np.ones(len(images), dtype=bool)
    for name in (f for f in fields if f != "label"):
        want = columns(y, [name])[:, 0].cpu().numpy().astype(np.float64)
        got = found[name]
        error = np.abs(got - want)
        cols[f"{name}_mae"] = float(np.nanmean(error)) if np.isfinite(error).any() else None
        cols[f"{name}_slope"] = slope(want, got)
        met &= np.nan_to_num(error, nan=np.inf) <= TOLERANCE[name]
        details["tolerance"][name] = TOLERANCE[name]
        details[f"{name}_unmeasured"] = int((~np.isfinite(got)).sum())
        details[f"{name}_by_request"] = {f"{v:g}": _mean(got[want == v]) for v in np.unique(want)}
    judged = [f for f in fields if f != "label"] + (["label"] if "label" in fields and predicted is not None else [])
    if "label" in judged:
        met &= predicted == labels_of(y).cpu().numpy()
    cols["joint_success"] = float(met.mean()) if judged else None  # nothing asked that can be judged: no success
    if judged:  # per distinct request (the class, then each attribute asked): where a run mixes requests
        values = columns(y, names).tolist() if names else [[] for _ in range(len(y))]
        label = [str(c) if "label" in fields else "any" for c in labels_of(y).tolist()]
        keys = np.array([" ".join([c, *(f"{n}={v:g}" for n, v in zip(names, row))]) for c, row in zip(label, values)])
        details["joint_success_by_request"] = {k: float(met[keys == k].mean()) for k in sorted(set(keys))}
    free = [a for a in ATTRIBUTES if a not in fields]
    if stats:
        ratios = [np.nanstd(found[a]) / stats[a]["std"] for a in free if a in stats]
        cols["free_spread"] = float(np.mean(ratios)) if ratios else None
    cols["request"] = " ".join(fields)
    details["measured_mean"] = {a: float(np.nanmean(found[a])) for a in ATTRIBUTES}
    return cols, details


def matched_reference(
    y: torch.Tensor, null_class: int, real_labels: np.ndarray, real_values: np.ndarray, seed: int = 0
) -> np.ndarray:
    """For each sample, the index of a real image of its requested bin, or -1 where the bin holds none: a real image
    of the requested class (where the label is asked) whose every attribute asked lies within TOLERANCE of the
    request. The images of a bin are drawn in a fixed random order (`seed`), without replacement while they last,
    then again in the same order; the reference set of `fid_bin` (the samples' FID against real digits of the same
    class and attribute bin). real_values (N, len(ATTRIBUTES)) in guidelab.morpho's units, NaN where unmeasured."""
    fields = asked(y, null_class)
    names = [f for f in fields if f != "label"]
    want = columns(y, names).cpu().numpy().astype(np.float64) if names else np.zeros((len(y), 0))
    labels = labels_of(y).cpu().numpy()
    real = np.asarray(real_values, dtype=np.float64)[:, [ATTRIBUTES.index(n) for n in names]]
    rng = np.random.default_rng(seed)
    out = np.full(len(y), -1, dtype=np.int64)
    keys = np.concatenate([labels[:, None].astype(np.float64), want], axis=1)
    for key in np.unique(keys, axis=0):
        mine = np.flatnonzero((keys == key).all(1))
        inside = np.ones(len(real), dtype=bool)
        if "label" in fields:
            inside &= np.asarray(real_labels) == int(key[0])
        for i, name in enumerate(names):
            inside &= np.nan_to_num(np.abs(real[:, i] - key[1 + i]), nan=np.inf) <= TOLERANCE[name]
        pool = rng.permutation(np.flatnonzero(inside))
        if len(pool):
            out[mine] = pool[np.arange(len(mine)) % len(pool)]
    return out
