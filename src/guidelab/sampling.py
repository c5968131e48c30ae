"""Samplers: pure functions over any eps-function (see guidance.py); they know nothing about guidance modes.

Each applies the classifier score term `Guided.score` (s * grad log p(y | x_t)) in its own form, as Dhariwal &
Nichol 2021 prescribe: DDPM shifts the mean (Alg. 1), DDIM corrects eps (Alg. 2).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from guidelab.diffusion import Diffusion, _gather
from guidelab.errors import GuidelabError
from guidelab.guidance import EpsFn

SAMPLERS = ("ddpm", "ddim")


def _x0_and_eps(diffusion: Diffusion, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, clip_x0: bool):
    """x_0 from eps; with clipping to the data range [-1, 1], eps is recomputed from the clipped x_0."""
    x0 = diffusion.predict_x0(x, t, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = diffusion.eps_from_x0(x, t, x0)
    return x0, eps


@torch.no_grad()
def ddpm(eps_fn: EpsFn, diffusion: Diffusion, noise: torch.Tensor, steps: int | None = None, clip_x0: bool = True,
         generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 Alg. 2 (posterior variance, Eq. 7), optionally respaced to `steps`
    (Nichol & Dhariwal 2021, Sec. 4); classifier term as the mean shift mu + Sigma * score (Dhariwal & Nichol 2021, Alg. 1)."""
    d = diffusion.respace(steps)
    x = noise
    for i in tqdm(range(d.num_steps - 1, -1, -1), disable=not progress, desc="ddpm", leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = eps_fn(x, d.model_t.to(x.device)[t])
        x0, _ = _x0_and_eps(d, x, t, out.eps, clip_x0)
        mean, var = d.posterior(x0, x, t)
        if out.score is not None:
            mean = mean + var * out.score
        if i > 0:
            mean = mean + var.sqrt() * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x = mean
    return x


@torch.no_grad()
def ddim(eps_fn: EpsFn, diffusion: Diffusion, noise: torch.Tensor, steps: int | None = 50, eta: float = 0.0,
         clip_x0: bool = True, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM, Song et al. 2021 Eq. 12 with sigma from Eq. 16 (eta = 0 deterministic, eta = 1 DDPM-like);
    classifier term as eps - sqrt(1 - abar_t) * score (Dhariwal & Nichol 2021, Alg. 2)."""
    d = diffusion.respace(steps)
    x = noise
    for i in tqdm(range(d.num_steps - 1, -1, -1), disable=not progress, desc="ddim", leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = eps_fn(x, d.model_t.to(x.device)[t])
        eps = out.eps
        if out.score is not None:
            eps = eps - _gather((1 - d.abar).sqrt(), t, x) * out.score
        x0, eps = _x0_and_eps(d, x, t, eps, clip_x0)
        abar_prev = _gather(d.abar_prev, t, x)
        sigma = eta * ((1 - abar_prev) / (1 - _gather(d.abar, t, x)) * (1 - _gather(d.alphas, t, x))).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x


def sample(name: str, eps_fn: EpsFn, diffusion: Diffusion, noise: torch.Tensor, steps: int | None, eta: float = 0.0,
           clip_x0: bool = True, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Dispatch by sampler name (`sampler.name` in the config)."""
    if name == "ddpm":
        return ddpm(eps_fn, diffusion, noise, steps, clip_x0, generator, progress)
    if name == "ddim":
        return ddim(eps_fn, diffusion, noise, steps, eta, clip_x0, generator, progress)
    raise GuidelabError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
