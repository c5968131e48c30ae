"""Classifier guidance on measured attributes ("CG on attributes"): the gradient of a Gaussian log-likelihood of the
requested attribute values under a noisy attribute regressor (guidelab.models.NoisyRegressor), the attributes'
counterpart of the noisy classifier's grad log p_phi(y | x_t) (Dhariwal & Nichol 2021, Sec. 4.1). Pure functions; no
mode is registered here.

The approximation. The regressor is trained by MSE on x_t, so r_phi(x_t, t) estimates the posterior mean E[v | x_t]
of the measurement v of the clean image. The likelihood of a requested value under the noised image is approximated
by a Gaussian around that mean whose variance is the regressor's held-out squared error at that noise level:

    p(v | x_t) ~ N(v; r_phi(x_t, t), sigma_t^2),   sigma_t = the held-out RMSE in t's bucket (NoisyRegressor.sigma_t),

    grad_{x_t} log p(v | x_t) = (v - r_phi(x_t, t)) / sigma_t^2 * d r_phi(x_t, t) / d x_t   (sigma_t taken as constant
    in x_t: one variance per noise level, not per image),

which is the term Dhariwal & Nichol's classifier guidance needs for a condition v in place of a class y: the sampler
applies s * grad as it applies the classifier's (DDPM mean shift, Alg. 1; DDIM eps correction, Alg. 2). sigma_t grows
with the noise, so the guidance weakens where the regressor cannot yet read the attribute and sharpens as it can.

Composition (the issue's framing). Summed with the classifier's log-softmax term, and over attributes, the gradients
add: log p(y | x_t) + sum_i log p(v_i | x_t) is the log of a product of experts (Hinton 2002), the joint request
under the assumption that the fields are conditionally independent given x_t. NOT (steer away from a value) is the
same term subtracted (a negative weight), not a term of its own; note that a Gaussian's negated log-likelihood grows
without bound away from v, so a NOT term keeps pushing rather than settling.
"""

from __future__ import annotations

import torch

from guidelab.errors import GuidelabError
from guidelab.models.regressor import t_bucket


def gaussian_log_likelihood(pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sum over attributes of log N(target; pred, sigma^2) up to its constant: -0.5 ((target - pred) / sigma)^2 -
    log sigma, per row (B,); the -0.5 log(2 pi) per attribute is dropped (no gradient, no ranking changes). pred,
    target, sigma (B, A); an entry whose target is NaN (not asked) contributes 0 and passes no gradient (no NaN leaks
    into the gradient through the masked branch: the NaN is replaced before the arithmetic)."""
    asked = ~torch.isnan(target)
    target = torch.where(asked, target, pred.detach())  # a finite stand-in, masked out below
    terms = -0.5 * ((target - pred) / sigma).square() - sigma.log()
    return torch.where(asked, terms, torch.zeros_like(terms)).sum(-1)


def sigma_at(regressor, t: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
    """The regressor's predictive SD at each timestep (B, A): its held-out RMSE `sigma_t` (A, K) in raw units, read
    in the bucket floor(t K / T) (`guidelab.models.regressor.t_bucket`), T = `num_steps`, else the regressor's own
    (the schedule it was trained on, stored with its weights)."""
    T = int(regressor.num_steps) if num_steps is None else num_steps
    if T <= 0:
        raise GuidelabError("the regressor does not record its schedule's T (num_steps); pass num_steps=T")
    sigma_t = regressor.sigma_t
    return sigma_t[:, t_bucket(t.to(sigma_t.device), T, sigma_t.shape[1])].T


def regressor_grad(
    regressor, x: torch.Tensor, t: torch.Tensor, targets: torch.Tensor, sigma: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_{x_t} log N(targets; r_phi(x_t, t), sigma^2), the prediction r_phi(x_t, t) (B, A)): the gradient of
    `gaussian_log_likelihood` with respect to x only (the regressor frozen, no graph kept after the call), as
    guidance.classifier.classifier_grad takes the classifier's. targets (B, A) in raw units (NaN = not asked: no
    pull); sigma (B, A), or None for the regressor's own held-out error at t (`sigma_at`). The derivation is in this
    module's docstring."""
    if sigma is None:
        sigma = sigma_at(regressor, t)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        pred = regressor(x, t)
        ll = gaussian_log_likelihood(pred.float(), targets.to(x.device, torch.float32), sigma.to(x.device).float())
        (grad,) = torch.autograd.grad(ll.sum(), x)
    return grad, pred.detach()
