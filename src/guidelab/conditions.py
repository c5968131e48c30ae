"""What a network is conditioned on, in one place: a class index per sample, whose null (the unconditional input of
classifier-free guidance) is the index `num_classes`, and measured attributes (guidelab.morpho's), whose null is NaN.

A batch's conditions are plain labels (B,) for a class-only request, else condition rows (B, len(FIELDS)) of float32
(`rows`): the class and every attribute in raw units, each network reading the columns it knows. `drop_labels` /
`drop_fields` are the one null mechanism of training (the networks' condition dropout and the guidance-free losses
draw through them); `requested` is the one place that reads the condition a sampling run asks for from its config.
"""

from __future__ import annotations

import itertools
import math

import torch

from guidelab.errors import GuidelabError


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int | None) -> torch.Tensor:
    """Each label replaced by null_class with probability p_uncond (Ho & Salimans 2022, Alg. 1): one uniform draw per
    row from the default generator on y's device, so every caller (a network's label dropout, a loss that drops labels
    itself) keeps the same random stream. p_uncond <= 0 or no null class: y unchanged, nothing drawn."""
    if p_uncond <= 0 or null_class is None:
        return y
    drop = torch.rand(y.shape[0], device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def requested_labels(
    labels, num_samples: int, num_classes: int, class_names: list[str] | None = None, where: str = "the checkpoint"
) -> torch.Tensor:
    """`labels=null`: all classes, evenly (sample i gets class i % K); otherwise the listed classes in turn, each a
    class index or a class name of the checkpoint's data (`class_names`, e.g. the folder names of dataset=folder:
    labels=[cat,dog]); an unknown name is refused with the valid ones, naming `where` they come from."""
    names, one = list(class_names or []), isinstance(labels, (int, str))
    classes = list(range(num_classes)) if labels is None else [labels] if one else list(labels)
    for i, c in enumerate(classes):
        if isinstance(c, str) and c in names:
            classes[i] = names.index(c)
        elif isinstance(c, str):
            shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
            raise GuidelabError(
                f"labels: no class named {c!r} in {where}; its classes: {shown or 'unnamed'}; "
                f"use those names or class indices in [0, {num_classes})"
            )
        elif not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num_classes:
            raise GuidelabError(
                f"labels must be class indices in [0, {num_classes}) or class names; got {c!r}; "
                f"e.g. labels=[0,3] or labels=null for all classes"
            )
    return torch.tensor(classes, dtype=torch.long).repeat(num_samples // len(classes) + 1)[:num_samples]


# ---------------------------------------------------------------- condition rows: a class and measured attributes
FIELDS = ("label", "area", "length", "thickness", "slant", "width", "height")  # a row's columns, in this order
ATTRIBUTES = FIELDS[1:]  # guidelab.morpho's measurements (Castro et al. 2019, Sec. 3), in pixels of a 28 px canvas


def rows(labels: torch.Tensor, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """A batch's conditions as one float32 tensor (B, len(FIELDS)): column 0 the class index (the null class =
    no class asked), then one column per attribute in raw units (NaN = not asked, the attribute's null). One row
    type serves every network: each reads the columns of the fields it knows (`columns`)."""
    out = torch.full((labels.shape[0], len(FIELDS)), float("nan"), device=labels.device)
    out[:, 0] = labels.float()
    for name, v in (values or {}).items():
        out[:, FIELDS.index(name)] = torch.as_tensor(v, dtype=torch.float32, device=labels.device)
    return out


def labels_of(y: torch.Tensor) -> torch.Tensor:
    """The class of each row: y itself for plain labels (B,), column 0 of condition rows (B, F)."""
    return y if y.dim() == 1 else y[:, 0].long()


def columns(y: torch.Tensor, names) -> torch.Tensor:
    """The attribute columns `names` of condition rows (B, len(names)); plain labels carry none (all NaN)."""
    if y.dim() == 1:
        return torch.full((y.shape[0], len(names)), float("nan"), device=y.device)
    return y[:, [FIELDS.index(n) for n in names]]


def null_like(y: torch.Tensor, null_class: int) -> torch.Tensor:
    """The unconditional input for y: every field at its null (the null class; NaN for every attribute)."""
    if y.dim() == 1:
        return torch.full_like(y, null_class)
    return rows(torch.full((y.shape[0],), null_class, dtype=torch.long, device=y.device))


def keep(y: torch.Tensor, fields, null_class: int) -> torch.Tensor:
    """Rows with only `fields` kept and every other field at its null: the single-field condition c_i of composed
    CFG (Liu et al. 2022, Eq. 10 term eps(x_t, c_i))."""
    out = null_like(y, null_class)
    idx = [FIELDS.index(f) for f in fields]
    out[:, idx] = y[:, idx]
    return out


def asked(y: torch.Tensor, null_class: int | None) -> tuple[str, ...]:
    """The fields a batch asks for, read from its first row (every row of a run asks the same fields): the class
    unless it is the null class, and every attribute whose column is not NaN."""
    first = y[:1] if y.dim() == 1 else y[0]
    fields = () if null_class is not None and int(first[0]) == null_class else ("label",)
    return fields + tuple(f for i, f in enumerate(FIELDS) if i and y.dim() == 2 and not torch.isnan(first[i]))


def drop_fields(y: torch.Tensor, p_uncond: float, null_class: int | None, p_field: float = 0.0) -> torch.Tensor:
    """Condition dropout over fields: every field of a row dropped to its null independently with probability
    p_field, then the whole row with probability p_uncond (Liu et al. 2022 train composable CFG this way: each
    condition's null learned alone, and the joint null). Plain labels (B,): `drop_labels` (the same draws)."""
    if y.dim() == 1:
        return drop_labels(y, p_uncond, null_class)
    if null_class is None or (p_uncond <= 0 and p_field <= 0):
        return y
    null = null_like(y, null_class)
    if p_field > 0:
        one = torch.rand(y.shape, device=y.device) < p_field
        y = torch.where(one, null, y)
    if p_uncond > 0:
        every = torch.rand(y.shape[0], 1, device=y.device) < p_uncond
        y = torch.where(every, null, y)
    return y


def _values(name: str, value, where: str) -> list[float]:
    """A requested attribute's values: a number or a list of numbers, each finite; an unknown name is refused."""
    if name not in ATTRIBUTES:
        raise GuidelabError(
            f"{where}.{name}: no attribute {name!r}; the measured attributes are {', '.join(ATTRIBUTES)} "
            f"(guidelab.morpho, in pixels of a 28 px canvas; slant in radians)"
        )
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise GuidelabError(f"{where}.{name}={v!r} is not a finite number; e.g. {where}.{name}=3.5")
    if not values:
        raise GuidelabError(f"{where}.{name} is an empty list; give a number or a list, e.g. {where}.{name}=[2,4]")
    return [float(v) for v in values]


def requested(
    labels, attrs, num_samples: int, num_classes: int, class_names=None, where: str = "the checkpoint", negative=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The condition of every sample a run draws, and its NOT (None without one), the one place a request is read.

    Without attributes: `requested_labels` (plain labels, as every class-only run). With `attrs` {name: value or
    list}: condition rows, one for every combination of the class list and each attribute's values (the class
    varying fastest), sample i taking combination i % n; `labels=any` leaves the class free (its null).
    `negative` {field: value} ("label" or an attribute) is the NOT of the request: rows holding only those fields,
    which the guidance steers away from (a negative prompt)."""
    attrs, negative = dict(attrs or {}), dict(negative or {})
    if not attrs and not negative and labels != "any":
        return requested_labels(labels, num_samples, num_classes, class_names, where), None
    if labels == "any":
        classes = torch.tensor([num_classes])
    else:
        one = labels is None or isinstance(labels, (int, str))
        listed = list(range(num_classes)) if labels is None else [labels] if one else list(labels)
        classes = requested_labels(listed, len(listed), num_classes, class_names, where)
    grid = [classes.tolist()] + [_values(n, v, "attrs") for n, v in attrs.items()]
    combos = list(itertools.product(*reversed(grid)))  # the class (last) varies fastest
    picked = [combos[i % len(combos)] for i in range(num_samples)]
    columns_ = list(zip(*picked))[::-1]
    y = rows(torch.tensor(columns_[0]), {n: torch.tensor(c) for n, c in zip(attrs, columns_[1:])})
    if not negative:
        return y, None
    not_class = negative.pop("label", None)
    values = {n: _values(n, v, "negative") for n, v in negative.items()}
    if any(len(v) > 1 for v in values.values()):
        raise GuidelabError("negative.<field> takes one value (what to steer away from), e.g. negative.slant=0.5")
    null = num_classes if not_class is None else int(requested_labels(not_class, 1, num_classes, class_names, where))
    away = rows(torch.full((num_samples,), null), {n: torch.full((num_samples,), v[0]) for n, v in values.items()})
    return y, away


def combinations(y: torch.Tensor, class_names, null_class: int) -> tuple[list[int], list[str]]:
    """The distinct conditions of a run in the order first asked, and which one each sample had: (index per sample,
    a name per condition, e.g. "7 thickness=4.5 slant=-0.3"; "any" for no class). grid.png's rows for a request with
    attributes."""
    names, index, seen = [], [], {}
    for row in y.tolist():
        key = tuple("nan" if v != v else v for v in row)  # NaN != NaN: compared as text
        if key not in seen:
            label = int(row[0])
            parts = ["any" if label == null_class else str(class_names[label]) if class_names else str(label)]
            parts += [f"{f}={v:g}" for f, v in zip(FIELDS[1:], row[1:]) if v == v]
            seen[key] = len(names)
            names.append(" ".join(parts))
        index.append(seen[key])
    return index, names


def check_values(attrs, negative, weights) -> None:
    """The request's values checked before anything is loaded (every job of a sweep): each attribute asked a finite
    number or a list of them, each NOT a single one, each weight a finite number (the label's NOT and the labels are
    checked against the checkpoint's classes when it is read)."""
    for name, value in (attrs or {}).items():
        _values(name, value, "attrs")
    for name, value in (negative or {}).items():
        if name != "label" and len(_values(name, value, "negative")) > 1:
            raise GuidelabError(f"negative.{name} takes one value (what to steer away from), e.g. negative.{name}=0.5")
    for name, value in (weights or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GuidelabError(f"weights.{name}={value!r} is not a finite number; e.g. weights.{name}=4")
