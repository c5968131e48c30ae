"""The gradients that classifier guidance adds, on plain tensors: a classifier's log-probability of the requested class
and its input gradient, the entropy factor of entropy-driven sampling, and the bound that Tweedie's formula puts on
any such gradient. Shared by the classifier modes and by the composition of guides (a classifier and a regressor)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log_p(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[y] per sample, in float32 at least (half-precision logits are upcast, double kept)."""
    log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return log_probs[torch.arange(len(y), device=y.device), y]


def entropy_factor(logits: torch.Tensor) -> torch.Tensor:
    """log(C) / H(p) per sample, p = softmax(logits), as a (B, 1, ..) tensor for x-shaped terms: the entropy-driven
    scale of Zheng et al. 2022 ("Entropy-driven Sampling and Training Scheme for Conditional Diffusion Generation",
    ECCV, Sec. 3.2: s_t = s log(C) / H(p_phi(. | x_t)), as in the authors' released sampler). It is 1 where the
    classifier knows nothing (uniform p) and grows as p sharpens, so the guidance keeps pushing where the classifier's
    own gradient fades. H is floored at 1e-8 nats (a one-hot p would give an infinite scale)."""
    logp = F.log_softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    entropy = (-(logp.exp() * logp).sum(-1)).clamp(min=1e-8)
    return (math.log(logits.shape[-1]) / entropy).view(-1, 1, 1, 1)


def classifier_grad(classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, objective=log_p):
    """(grad_x objective(classifier(x, t), y), the logits), the gradient with respect to x only, no graph kept."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = classifier(x, t)
        (grad,) = torch.autograd.grad(objective(logits, y).sum(), x)
    return grad, logits.detach()


def classifier_score(classifier, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_{x_t} log p_phi(y | x_t, t) (Dhariwal & Nichol 2021, Sec. 4.1). The gradient is taken with respect to x_t
    only (the classifier's parameters are frozen by `make_eps_fn`) and no graph outlives the call."""
    return classifier_grad(classifier, x_t, t, y)[0]


DATA_RANGE = 2.0  # max - min of a pixel of the data in [-1, 1]: how far two posterior means of a pixel can differ


def tweedie_bound(grad: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """A classifier's gradient grad_{x_t} log p(y | x_t) brought within what a Bayes-optimal classifier's can be: each
    sample's gradient, where a component exceeds DATA_RANGE sqrt(abar_t) / (1 - abar_t), is shrunk as a whole (its
    direction kept) until none does; within the bound it is itself.

    The bound: Tweedie's formula (Robbins 1956; Efron 2011, "Tweedie's Formula and Selection Bias", Eq. 2.8) gives the
    posterior mean of x0 from the score of the noised data, E[x0 | x_t] = (x_t + (1 - abar_t) grad log p_t(x_t)) /
    sqrt(abar_t), and with p(y | x_t) = p_t(x_t | y) p(y) / p_t(x_t) the classifier's gradient is a difference of two
    posterior means: grad_{x_t} log p(y | x_t) = sqrt(abar_t) / (1 - abar_t) (E[x0 | x_t, y] - E[x0 | x_t]). For data in
    [-1, 1] each pixel of that difference lies within +-DATA_RANGE, so each component of the gradient within
    +-DATA_RANGE sqrt(abar_t) / (1 - abar_t); a Bayes classifier comes close to it (tests/test_cg_schedules.py).
    Classifier guidance applies exactly this difference: Dhariwal & Nichol 2021's eps correction (Alg. 2) moves the data
    prediction by (1 - abar_t) / sqrt(abar_t) s grad, s times the implied difference, in every eps-form sampler.

    Why: a learned classifier's gradient need not vanish as sqrt(abar_t) where x_t holds no signal. At the capped last
    step of the cosine schedule (abar = 2.4e-9, where the linspace and trailing grids start) a noisy classifier's
    gradient measured 1e-2 per pixel, 100 times the bound, from t = 990 to 957 about the same: its length there is
    untrained, and the eps correction moved x0 by some 200 data ranges, saturating every sample into one pattern per
    class (docs/results.md, "Classifier guidance on every schedule"). Shrinking keeps what the classifier points at and
    removes only the length no classifier can mean; clipping each component to the bound instead (the nearest point of
    the allowed box) turns such a gradient into one at the bound in every pixel, a saturated pattern that s = 10 still
    carried into the samples. DDPM's mean shift (Alg. 1) applies the same shrunk gradient."""
    bound = DATA_RANGE * abar_t.sqrt() / (1 - abar_t)
    excess = (grad.abs() / bound).flatten(1).amax(1).clamp(min=1)  # 1 where the gradient is within the bound
    return grad / excess.view(-1, *[1] * (grad.dim() - 1))
