"""Classifier guidance: modes that add the gradient of a classifier's log-probability of the requested class, a
noisy classifier on x_t (Dhariwal & Nichol 2021) or a clean one on the denoised estimate (Bansal et al. 2023), as the
`score` term that each sampler applies in its own form. The gradients are taken with respect to x_t only, the
classifier frozen, no graph kept between steps; their wall time is the classifier's share of a run."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from guidelab.diffusion import Diffusion
from guidelab.guidance.cfg_like import BASE, INTERVAL_TOP, SIGMA
from guidelab.guidance.core import MODES, Context, in_interval
from guidelab.guided import EpsFn, Guided
from guidelab.registry import Range

CLASSIFIER_SCALE = Range(0, math.inf, "the classifier gradient's weight (Dhariwal & Nichol's s; 0 = off)")


def log_p(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[y] per sample, in float32 at least (half-precision logits are upcast, double kept)."""
    log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return log_probs[torch.arange(len(y), device=y.device), y]


def classifier_score(classifier, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_{x_t} log p_phi(y | x_t, t) (Dhariwal & Nichol 2021, Sec. 4.1). The gradient is taken with respect to x_t
    only (the classifier's parameters are frozen by `make_eps_fn`) and no graph outlives the call."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_p(classifier(x, t), y).sum(), x)
    return grad


def x0_classifier_score(
    unet,
    classifier,
    diffusion: Diffusion,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    y: torch.Tensor,
    timed: Callable = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, grad_{x_t} log p_phi(y | x0_hat(x_t))) for a clean classifier p_phi (trained on clean images, called at
    t = 0) on the denoised estimate x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps(x_t, labels)) / sqrt(abar_t), the gradient
    taken through the UNet: Bansal et al. 2023 ("Universal Guidance for Diffusion Models"), Sec. 3.1, forward universal
    guidance eps_hat = eps + s sqrt(1 - abar_t) grad_{x_t} l(y, phi(x0_hat)) with the cross-entropy l = -log p_phi, i.e.
    Dhariwal & Nichol's eps correction with grad_{x_t} log p_phi(y | x0_hat(x_t)) in place of the noisy classifier's.
    One UNet pass gives both; the gradient is taken with respect to x_t only (no parameter gradients accumulate) and
    no graph outlives the call. `timed()` brackets what the gradient adds to the UNet pass: the classifier on x0_hat and
    the backward pass through it and the UNet."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        eps = unet(x, t, labels)
        with timed():
            x0_hat = diffusion.predict_x0(x, t, eps)
            (grad,) = torch.autograd.grad(log_p(classifier(x0_hat, torch.zeros_like(t)), y).sum(), x)
    return eps.detach(), grad


def classifier_term(ctx: Context, x: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor | None:
    """s * grad_x log p_phi(y | x_t) of the noisy classifier (None at s = 0: no classifier pass)."""
    if scale == 0:
        return None
    with ctx.timed():
        return scale * classifier_score(ctx.classifier, x, t, ctx.y)


# ---------------------------------------------------------------- the modes
@MODES.register(needs=("classifier",), scale=CLASSIFIER_SCALE, w=False, base=BASE, uses="base")
def _cg(ctx: Context, base: str = "uncond") -> EpsFn:
    """eps(x_t, null) (base=uncond) or eps(x_t, y) (base=cond) plus the classifier term s * grad log p_phi(y | x_t)
    (Dhariwal & Nichol 2021, Alg. 1 / Alg. 2)."""
    labels = ctx.base_labels(base)
    return lambda x, t: Guided(ctx.unet(x, t, labels), classifier_term(ctx, x, t, ctx.scale))


@MODES.register(needs=("clean_classifier", "diffusion"), scale=CLASSIFIER_SCALE, w=False, base=BASE, uses="base")
def _cg_x0(ctx: Context, base: str = "uncond") -> EpsFn:
    """eps(x_t, null) (base=uncond) or eps(x_t, y) (base=cond) plus the classifier term s * grad log p_phi(y | x0_hat)
    of a clean classifier on the denoised estimate, through the UNet (`x0_classifier_score`, Bansal et al. 2023's
    forward universal guidance). One UNet pass per step, with its input gradient; at s = 0 a plain pass."""
    labels = ctx.base_labels(base)

    def eps_fn(x, t):
        if ctx.scale == 0:  # exactly the base model: no gradient
            return Guided(ctx.unet(x, t, labels))
        eps, grad = x0_classifier_score(ctx.unet, ctx.classifier, ctx.diffusion, x, t, labels, ctx.y, ctx.timed)
        return Guided(eps, ctx.scale * grad)

    return eps_fn


@MODES.register(needs=("classifier",), classifier_scale=Range(0, math.inf, "0 = plain CFG"))
def _cfg_cg(ctx: Context, classifier_scale: float = 1.0) -> EpsFn:
    """Both at once: the CFG prediction at `scale` plus the classifier term at `classifier_scale`."""
    return lambda x, t: Guided(ctx.cfg(x, t, ctx.scale), classifier_term(ctx, x, t, classifier_scale))


@MODES.register(
    needs=("classifier", "diffusion"),
    scale=CLASSIFIER_SCALE,
    w=False,
    base=BASE,
    sigma_lo=SIGMA,
    sigma_hi=INTERVAL_TOP,
    uses="base",
)
def _cg_interval(ctx: Context, base: str = "uncond", sigma_lo: float = 0.28, sigma_hi: float = 5.42) -> EpsFn:
    """Classifier guidance only where sigma in (sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024's interval applied to
    the classifier term); elsewhere the base prediction alone."""
    labels = ctx.base_labels(base)

    def eps_fn(x, t):
        inside = in_interval(ctx.abar_t(x, t), sigma_lo, sigma_hi)
        eps = ctx.unet(x, t, labels)
        if not inside.any():
            return Guided(eps)
        score = classifier_term(ctx, x, t, ctx.scale)
        return Guided(eps, score if score is None or inside.all() else score * inside)

    return eps_fn
