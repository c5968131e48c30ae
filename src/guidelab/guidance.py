"""Guidance modes: each turns the networks and the requested labels into `eps_fn(x_t, t) -> Guided`.

Samplers know nothing about guidance: they call eps_fn and apply its two parts, the noise prediction `eps` and an
optional classifier score term `score` = s * grad_x log p_phi(y | x_t), each in the sampler's own form
(DDPM: mean shift, Dhariwal & Nichol 2021 Alg. 1; DDIM: eps correction, their Alg. 2).

Scale convention (see README): `scale` is s in eps = eps_u + s (eps_c - eps_u); s = 0 unconditional, s = 1
conditional, s > 1 guided. Ho & Salimans 2022 write w = s - 1. For classifier guidance `scale` multiplies
grad log p_phi(y | x_t) (Dhariwal & Nichol's s; 0 = off).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from guidelab.errors import GuidelabError

MODES = ("none", "cfg", "cg", "cfg_cg")
BASES = ("uncond", "cond")


class Guided(NamedTuple):
    eps: torch.Tensor  # the (guided) noise prediction
    score: torch.Tensor | None = None  # s * grad_x log p(y | x_t), applied by the sampler; None = no classifier term


EpsFn = Callable[[torch.Tensor, torch.Tensor], Guided]


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, Eq. 6 with w = s - 1).

    torch.lerp computes exactly this and returns eps_u at s = 0 and eps_c at s = 1 bit for bit."""
    return torch.lerp(eps_uncond, eps_cond, scale)


def classifier_score(classifier, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_{x_t} log p_phi(y | x_t, t) (Dhariwal & Nichol 2021, Sec. 4.1). The gradient is taken with respect to x_t
    only (the classifier's parameters are frozen by `make_eps_fn`) and no graph outlives the call."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x, t).float(), dim=-1)
        selected = log_probs[torch.arange(len(y), device=y.device), y]
        (grad,) = torch.autograd.grad(selected.sum(), x)
    return grad


def make_eps_fn(mode: str, unet, y: torch.Tensor, scale: float = 1.0, classifier=None,
                classifier_scale: float | None = None, base: str = "uncond") -> EpsFn:
    """Build the eps-function of one guidance mode for labels y.

    mode:
      none    eps(x_t, y) (base=cond, the conditional model) or eps(x_t, null) (base=uncond), no guidance
      cfg     eps_u + s (eps_c - eps_u), cond and uncond run as one doubled batch (Ho & Salimans 2022, Eq. 6)
      cg      eps(x_t, null) (base=uncond, default) or eps(x_t, y) (base=cond), plus the classifier term
              s * grad log p_phi(y | x_t) (Dhariwal & Nichol 2021, Alg. 1 / Alg. 2)
      cfg_cg  the CFG prediction at `scale` plus the classifier term at `classifier_scale`
    """
    if mode not in MODES:
        raise GuidelabError(f"unknown guidance mode {mode!r}; valid: {', '.join(MODES)}")
    if base not in BASES:
        raise GuidelabError(f"unknown guidance.base {base!r}; use guidance.base=uncond or guidance.base=cond")
    null = torch.full_like(y, unet.null_class)
    y_base = y if base == "cond" else null
    needs_classifier = mode == "cg" or mode == "cfg_cg"
    if needs_classifier:
        if classifier is None:
            raise GuidelabError(f"guidance={mode} needs a noisy classifier: pass classifier_ckpt=PATH "
                                "(train one with `python train_classifier.py`)")
        classifier.requires_grad_(False)
    cls_scale = scale if mode == "cg" else classifier_scale

    def cfg(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 0:  # exactly the unconditional model: one pass instead of two
            return unet(x_t, t, null)
        if scale == 1:  # exactly the conditional model
            return unet(x_t, t, y)
        eps_cond, eps_uncond = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return cfg_combine(eps_uncond, eps_cond, scale)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> Guided:
        eps = cfg(x_t, t) if mode in ("cfg", "cfg_cg") else unet(x_t, t, y_base)
        if not needs_classifier or cls_scale == 0:
            return Guided(eps)
        return Guided(eps, cls_scale * classifier_score(classifier, x_t, t, y))

    return eps_fn
