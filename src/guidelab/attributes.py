"""The measured attributes of a data set's images (guidelab.morpho: area, length, thickness, slant, width, height),
computed once per data set, split and size and cached beside the data, and the training set's statistics that a
network conditioned on them stores.

An image is measured at the size the network is trained on, so that what a network learns is what the judge
(the same measurement, applied to its samples) reads back. Morpho-MNIST's measurements are defined for digits: other
data sets are refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import numpy as np
import torch

from guidelab.conditions import ATTRIBUTES
from guidelab.data import ImageData, data_key, default_root
from guidelab.errors import GuidelabError
from guidelab.files import atomic_npz, key_digest

DIGITS = ("mnist", "mnist5k")  # the data sets whose images Morpho-MNIST's measurements describe
VERSION = 1  # of the measurement: a change to guidelab.morpho's rules bumps it, so no cache outlives them


def check_defined(dataset: Mapping, why: str) -> None:
    """Refuse attributes on a data set they are not defined on (Morpho-MNIST measures handwritten digits)."""
    if dataset["name"] not in DIGITS:
        raise GuidelabError(
            f"{why} needs measured attributes, which are defined on handwritten digits only (Morpho-MNIST): "
            f"dataset={dataset['name']} has none; use dataset=mnist or dataset=mnist5k"
        )


def measured(data: ImageData, dataset: Mapping, split: str) -> torch.Tensor:
    """Every image's attributes (N, len(ATTRIBUTES)) float32 in ATTRIBUTES' order, in pixels of a 28 px canvas (slant
    in radians): read from the cache (~/.cache/guidelab/data/attributes or $GUIDELAB_DATA/attributes), else measured
    (guidelab.morpho, both cores) and cached atomically. The cache is keyed by the data set's config, the split, the
    number of images and the measurement's version, and checked against a digest of the images themselves."""
    from guidelab import morpho

    check_defined(dataset, "attributes")
    pixels = ((data.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    config = {k: v for k, v in dict(dataset).items() if k != "download"}
    key = {"dataset": config, "split": split, "n": len(pixels), "version": VERSION, "files": data_key(dataset)}
    path = default_root() / "attributes" / f"{dataset['name']}-{split}-{key_digest(key, 16)}.npz"
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    if path.is_file():
        with np.load(path) as cached:
            if str(cached["digest"]) == digest and cached["values"].shape == (len(pixels), len(ATTRIBUTES)):
                return torch.from_numpy(cached["values"])
    found = morpho.measure(pixels)
    values = np.stack([found[name] for name in ATTRIBUTES], axis=1).astype(np.float32)
    atomic_npz(path, values=values, digest=np.array(digest))
    return torch.from_numpy(values)


def statistics(values: torch.Tensor, names) -> dict[str, dict[str, float]]:
    """Per attribute in `names`: the training set's mean and SD (a network's normalisation) and its 1st and 99th
    percentiles (the range a request counts as in the training distribution), NaNs (an empty image) left out."""
    out = {}
    for name in names:
        v = values[:, ATTRIBUTES.index(name)].double()
        v = v[~torch.isnan(v)]
        if len(v) < 2:
            raise GuidelabError(f"attribute {name} could be measured on {len(v)} images only; check the data set")
        lo, hi = torch.quantile(v, torch.tensor([0.01, 0.99], dtype=v.dtype)).tolist()
        out[name] = {"mean": v.mean().item(), "std": max(v.std().item(), 1e-6), "lo": lo, "hi": hi}
    return out


SPLIT = re.compile(r"^\s*([^:]+?)\s*:\s*(\w+)\s*([<>])\s*([01]?\.?\d*)\s*$")


def parse_exclusion(rule: str, class_names) -> tuple[int, str, str, float]:
    """A compositional split, `LABEL:ATTRIBUTE>Q` or `<Q`: the digits of class LABEL (an index or a class name) whose
    ATTRIBUTE lies above (below) its Q-quantile within that class, e.g. '7:thickness>0.8', the thickest fifth of the
    sevens. Returns (class, attribute, side, q); a malformed rule is refused in one line."""
    found = SPLIT.match(str(rule))
    example = "e.g. exclude='7:thickness>0.8' (the thickest fifth of the 7s)"
    if not found:
        raise GuidelabError(f"exclude={rule!r} is not LABEL:ATTRIBUTE>QUANTILE or <QUANTILE; {example}")
    label, name, side, q = found.groups()
    names = list(class_names or [])
    if label in names:
        label = names.index(label)
    elif label.isdigit() and int(label) < len(names):
        label = int(label)
    else:
        raise GuidelabError(f"exclude={rule!r}: no class {label!r}; use a class index or name ({', '.join(names)})")
    if name not in ATTRIBUTES:
        raise GuidelabError(f"exclude={rule!r}: no attribute {name!r}; measured ones: {', '.join(ATTRIBUTES)}")
    try:
        q = float(q)
    except ValueError:
        q = -1.0
    if not 0 < q < 1:
        raise GuidelabError(f"exclude={rule!r}: the quantile must lie strictly between 0 and 1; {example}")
    return label, name, side, q


def exclude(data: ImageData, values: torch.Tensor, rule: str) -> tuple[torch.Tensor, dict]:
    """The rows of a training split that a compositional split keeps (a boolean mask), and what it left out: the
    class, the attribute, the threshold in its units (the Q-quantile of that attribute within the class) and how many
    images. Every network of a study trained with the same rule never sees the combination."""
    label, name, side, q = parse_exclusion(rule, data.class_names)
    column = values[:, ATTRIBUTES.index(name)].double()
    mine = (data.labels == label) & ~torch.isnan(column)
    threshold = torch.quantile(column[mine], q).item()
    out = mine & ((column > threshold) if side == ">" else (column < threshold))
    info = {"rule": rule, "label": label, "attribute": name, "side": side, "threshold": threshold}
    return ~out, info | {"removed": int(out.sum())}
