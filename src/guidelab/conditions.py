"""What a network is conditioned on, in one place: today one class index per sample, whose null (the unconditional
input of classifier-free guidance) is the index `num_classes`.

`drop_labels` is the one null mechanism of training (the networks' label dropout and the guidance-free losses draw
through it); `requested_labels` is the one place that reads the condition a sampling run asks for from its config.
"""

from __future__ import annotations

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
