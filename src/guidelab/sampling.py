"""Samplers: pure functions over any eps-function (see guidance.py); they know nothing about guidance modes.

Each applies what the eps-function returns in its own form: the classifier score term `Guided.score`
(s * grad log p(y | x_t)) as Dhariwal & Nichol 2021 prescribe (DDPM shifts the mean, Alg. 1; DDIM and DPM-Solver++
correct eps, Alg. 2), and a data prediction `Guided.x0` (CFG++) in place of the one implied by eps, with eps kept as
the direction to re-noise along.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from guidelab.diffusion import Diffusion, _gather
from guidelab.errors import GuidelabError
from guidelab.guidance import EpsFn, Guided

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


def _x0_and_eps(diffusion: Diffusion, x: torch.Tensor, t: torch.Tensor, out: Guided, clip_x0: bool,
                eps_correction: bool = True):
    """The step's data prediction x_0 and noise direction eps.

    With `eps_correction` the classifier term enters as eps - sqrt(1 - abar_t) score (Dhariwal & Nichol 2021, Alg. 2).
    x_0 comes from eps unless the eps-function gave its own; clipping to the data range [-1, 1] then recomputes eps
    from the clipped x_0 (a given x_0 is clipped and its eps kept: it is the re-noising direction)."""
    eps = out.eps
    if out.score is not None and eps_correction:
        eps = eps - _gather((1 - diffusion.abar).sqrt(), t, x) * out.score
    if out.x0 is not None:
        return (out.x0.clamp(-1, 1) if clip_x0 else out.x0), eps
    x0 = diffusion.predict_x0(x, t, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = diffusion.eps_from_x0(x, t, x0)
    return x0, eps


def _timesteps(d: Diffusion, x: torch.Tensor, progress: bool, desc: str):
    """(respaced index i, model timestep) pairs from the noisiest to the cleanest, with a progress bar."""
    model_t = d.model_t.to(x.device)
    for i in tqdm(range(d.num_steps - 1, -1, -1), disable=not progress, desc=desc, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        yield i, t, model_t[t]


@torch.no_grad()
def ddpm(eps_fn: EpsFn, diffusion: Diffusion, noise: torch.Tensor, steps: int | None = None, clip_x0: bool = True,
         generator: torch.Generator | None = None, progress: bool = False, spacing: str = "time") -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 Alg. 2 (posterior variance, Eq. 7), optionally respaced to `steps`
    (Nichol & Dhariwal 2021, Sec. 4); classifier term as the mean shift mu + Sigma * score (Dhariwal & Nichol 2021, Alg. 1)."""
    d = diffusion.respace(steps, spacing)
    x = noise
    for i, t, model_t in _timesteps(d, x, progress, "ddpm"):
        out = eps_fn(x, model_t)
        x0, eps = _x0_and_eps(d, x, t, out, clip_x0, eps_correction=False)
        # a given x_0 (CFG++) is paired with x_t re-noised along its eps; otherwise that point is x_t itself
        x_t = x if out.x0 is None else _gather(d.abar.sqrt(), t, x) * x0 + _gather((1 - d.abar).sqrt(), t, x) * eps
        mean, var = d.posterior(x0, x_t, t)
        if out.score is not None:
            mean = mean + var * out.score
        if i > 0:
            mean = mean + var.sqrt() * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x = mean
    return x


@torch.no_grad()
def ddim(eps_fn: EpsFn, diffusion: Diffusion, noise: torch.Tensor, steps: int | None = 50, eta: float = 0.0,
         clip_x0: bool = True, generator: torch.Generator | None = None, progress: bool = False,
         spacing: str = "time") -> torch.Tensor:
    """DDIM, Song et al. 2021 Eq. 12 with sigma from Eq. 16 (eta = 0 deterministic, eta = 1 DDPM-like);
    classifier term as eps - sqrt(1 - abar_t) * score (Dhariwal & Nichol 2021, Alg. 2)."""
    d = diffusion.respace(steps, spacing)
    x = noise
    for i, t, model_t in _timesteps(d, x, progress, "ddim"):
        x0, eps = _x0_and_eps(d, x, t, eps_fn(x, model_t), clip_x0)
        abar_prev = _gather(d.abar_prev, t, x)
        sigma = eta * ((1 - abar_prev) / (1 - _gather(d.abar, t, x)) * (1 - _gather(d.alphas, t, x))).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x


@torch.no_grad()
def dpmpp_2m(eps_fn: EpsFn, diffusion: Diffusion, noise: torch.Tensor, steps: int | None = 20, clip_x0: bool = True,
             progress: bool = False, spacing: str = "logsnr") -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models"), Alg. 2: the multistep second-order solver of the probability-flow ODE in the data prediction x_0.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_next - lambda and
    r = h_prev / h, the step x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D with
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev (D = x0 at the first step) is written here as
    x_next = alpha_next x0 + sigma_next eps - alpha_next (e^{-h} - 1) (D - x0),
    which is the same update (x = alpha x0 + sigma eps) and lets a guided x0 and eps (CFG++, the classifier's eps
    correction) enter as in DDIM: the first-order part is exactly DDIM(eta=0). The last step, to abar = 1, is first
    order (x_0 itself), as diffusers' `lower_order_final` does. Steps are spaced evenly in lambda by default
    (spacing=logsnr, DPM-Solver's recommendation for low-resolution pixel models): with evenly spaced timesteps the
    last step into t = 0 is several times longer in lambda than the one before it, and the multistep extrapolation
    over it is poor (tests/test_sampling.py measures both)."""
    d = diffusion.respace(steps, spacing)
    x = noise
    lam = 0.5 * (d.abar.log() - (1 - d.abar).log())  # log(alpha / sigma) at each respaced step
    x0_prev, h_prev = None, None
    for i, t, model_t in _timesteps(d, x, progress, "dpmpp_2m"):
        x0, eps = _x0_and_eps(d, x, t, eps_fn(x, model_t), clip_x0)
        if i == 0:  # abar_prev = 1: the data itself
            return x0
        abar_next = d.abar[i - 1].to(x.device)
        h = lam[i - 1] - lam[i]
        x_next = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps
        if x0_prev is not None:
            r = h_prev / h
            x_next = x_next - abar_next.sqrt() * torch.expm1(-h).to(x.device) * (x0 - x0_prev) / (2 * r.to(x.device))
        x, x0_prev, h_prev = x_next, x0, h
    return x


def sample(name: str, eps_fn: EpsFn, diffusion: Diffusion, noise: torch.Tensor, steps: int | None, eta: float = 0.0,
           clip_x0: bool = True, generator: torch.Generator | None = None, progress: bool = False,
           spacing: str | None = None) -> torch.Tensor:
    """Dispatch by sampler name (`sampler.name` in the config); spacing None = the sampler's default."""
    extra = {} if spacing is None else {"spacing": spacing}
    if name == "ddpm":
        return ddpm(eps_fn, diffusion, noise, steps, clip_x0, generator, progress, **extra)
    if name == "ddim":
        return ddim(eps_fn, diffusion, noise, steps, eta, clip_x0, generator, progress, **extra)
    if name == "dpmpp_2m":
        return dpmpp_2m(eps_fn, diffusion, noise, steps, clip_x0, progress, **extra)
    raise GuidelabError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
