"""Samplers: pure functions over any eps-function (guided.py); they know nothing about guidance modes.

A sampler is one function registered in SAMPLERS with the shared signature
`(eps_fn, noise, process, *, clip_x0, generator, progress, **its own keys)`: `process` is the diffusion respaced to the
timestep grid of `timesteps` (every sampler's grid, ending with a step to sigma = 0); its own keys, with their
defaults, are its config keys. Every sampler's config (the option `sampler=<name>`, generated from the function) also
holds the shared keys: `steps` (timesteps of the grid out of T, the network evaluations of a pass; null = all T),
`spacing` (linspace | leading | trailing | logsnr, see `timesteps`) and `clip_x0` (clip the predicted x_0 to the data
range [-1, 1] at every evaluation), each sampler declaring its own defaults of steps and spacing.

Each applies what the eps-function returns in its own form: the classifier score term `Guided.score`
(s * grad log p(y | x_t)) as Dhariwal & Nichol 2021 prescribe (DDPM shifts the mean, Alg. 1; the others correct eps,
Alg. 2), and a data prediction `Guided.x0` (CFG++) in place of the one implied by eps, with eps kept as the direction
to re-noise along.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from guidelab.diffusion import Diffusion, gather, log_snr
from guidelab.guided import EpsFn, Guided
from guidelab.registry import MISSING, OneOf, Range, Registry, Shared

SPACINGS = ("linspace", "leading", "trailing", "logsnr")
SAMPLERS = Registry(
    "sampler",
    fixed=("eps_fn", "noise", "process", "clip_x0", "generator", "progress"),
    shared={
        "steps": Shared(
            Optional[int], MISSING, Range(1, math.inf, "the number of network evaluations of the grid; null = all")
        ),
        "spacing": Shared(str, MISSING, OneOf(SPACINGS)),
        "clip_x0": Shared(bool, True),
    },
)
SIGMA_MAX = 80.0  # Karras et al. 2022, Sec. 5: beyond sigma = 80 data in [-1, 1] are lost in the noise


def timesteps(diffusion: Diffusion, steps: int | None, spacing: str) -> torch.Tensor:
    """The `steps` model timesteps a sampler evaluates (increasing; None = all T); every grid then ends with a step
    from its lowest timestep to sigma = 0 (abar = 1). Spacings as diffusers' schedulers name them, the first three
    computed as DDIMScheduler.set_timesteps computes them (diffusers 0.42, steps_offset 0: numpy, float64, rounded
    half to even), value for value:
      linspace  round(linspace(0, T - 1, steps)), t = 0 included;
      leading   0, T // steps, 2 T // steps, ...;
      trailing  round(arange(T, 0, -T / steps)) - 1, t = T - 1 first, the last T / steps - 1; for some (T, steps)
                (T = 1000: steps = 61, 103, ...) that float arange holds one value more, ~0, which diffusers keeps as a
                timestep -1: left out here, so the grid holds `steps` timesteps;
      logsnr    T - 1, then the timesteps nearest to evenly spaced lambda from max(lambda_{T-1}, -log SIGMA_MAX) to
                lambda_0 (DPM-Solver's logSNR grid, Lu et al. 2022, Sec. 3.3), `steps` distinct ones: with the cosine
                schedule lambda_{T-1} ~ -10 and evenly spaced targets would fall on few timesteps."""
    T = diffusion.num_steps
    OneOf(SPACINGS).check("sampler.spacing", spacing, {})
    if steps is None:
        return torch.arange(T)
    Range(1, T, "the number of network evaluations of the grid; null = all").check("sampler.steps", steps, {})
    if spacing == "linspace":
        return torch.from_numpy(np.linspace(0, T - 1, steps).round().astype(np.int64))
    if spacing == "leading":
        return torch.arange(steps) * (T // steps)
    if spacing == "trailing":
        return torch.from_numpy(np.round(np.arange(T, 0, -T / steps)[:steps]).astype(np.int64)[::-1] - 1)
    lam = log_snr(diffusion.abar.cpu())
    targets = torch.linspace(max(float(lam[-1]), -math.log(SIGMA_MAX)), float(lam[0]), steps - 1, dtype=lam.dtype)
    keep = [T - 1]
    for i, nearest in enumerate((lam.view(1, -1) - targets.view(-1, 1)).abs().argmin(1).tolist()):
        keep.append(max(steps - 2 - i, min(nearest, keep[-1] - 1)))  # below the previous, room left for the rest
    return torch.tensor(keep[::-1])


def _x0_and_eps(
    diffusion: Diffusion, x: torch.Tensor, t: torch.Tensor, out: Guided, clip_x0: bool, eps_correction: bool = True
):
    """The step's data prediction x_0 and noise direction eps.

    x_0 comes from eps unless the eps-function gave its own; clipping to the data range [-1, 1] then recomputes eps
    from the clipped x_0 (a given x_0 is clipped and its eps kept: it is the re-noising direction). With
    `eps_correction` the classifier term then enters as eps - sqrt(1 - abar_t) score (Dhariwal & Nichol 2021, Alg. 2),
    and x_0 follows the corrected eps unclipped: the order of guided-diffusion's `condition_score`, which corrects
    the eps of the clipped prediction and never clips again. Clipping after the correction instead would undo part of
    the classifier's push (measured in docs/results.md: CG's best accuracy 0.90 against 0.99 on the demo). A given
    `x0_shift` is then added to x_0, and eps follows it (in every sampler, DDPM's posterior mean included)."""
    eps = out.eps
    if out.x0 is not None:
        x0 = out.x0.clamp(-1, 1) if clip_x0 else out.x0
    else:
        x0 = diffusion.predict_x0(x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = diffusion.eps_from_x0(x, t, x0)
    if out.score is not None and eps_correction:
        eps = eps - gather((1 - diffusion.abar).sqrt(), t, x) * out.score
        x0 = diffusion.predict_x0(x, t, eps)
    if out.x0_shift is not None:
        x0 = x0 + out.x0_shift
        eps = diffusion.eps_from_x0(x, t, x0)
    return x0, eps


def _guided_shift(diffusion: Diffusion, x: torch.Tensor, t: torch.Tensor, out: Guided, clip_x0: bool):
    """(x_0, eps, the displacement of x_0 that the guidance terms made): `_x0_and_eps` of `out`, and the difference
    from the data prediction of its eps (or x0) alone; None where `out` has no score and no x0_shift."""
    x0, eps = _x0_and_eps(diffusion, x, t, out, clip_x0)
    if out.score is None and out.x0_shift is None:
        return x0, eps, None
    return x0, eps, x0 - _x0_and_eps(diffusion, x, t, Guided(out.eps, x0=out.x0), clip_x0)[0]


def _steps(d: Diffusion, x: torch.Tensor, progress: bool, desc: str):
    """(grid index i, model timestep) pairs from the noisiest to the cleanest, with a progress bar."""
    model_t = d.model_t.to(x.device)
    for i in tqdm(range(d.num_steps - 1, -1, -1), disable=not progress, desc=desc, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        yield i, t, model_t[t]


RECURRENCE = Range(0, 100, "self-recurrence: re-noise each step's result back to x_t and redo the step this often")


def renoise(d: Diffusion, x_prev: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """x_t = sqrt(alpha_t) x_{t-1} + sqrt(1 - alpha_t) eps', eps' ~ N(0, I), with alpha_t = abar_t / abar_{t-1} of the
    grid's process: the self-recurrence of Bansal et al. 2023 ("Universal Guidance for Diffusion Models"), Sec. 3.3
    (Alg. 1), which re-noises a guided step's result to its own noise level and steps again, giving the guidance
    more steps at the same noise level."""
    alpha = gather(d.alphas, t, x_prev)
    noise = torch.randn(x_prev.shape, device=x_prev.device, dtype=x_prev.dtype, generator=generator)
    return alpha.sqrt() * x_prev + (1 - alpha).sqrt() * noise


@SAMPLERS.register(steps=None, spacing="linspace", recurrence=RECURRENCE)  # all T steps; an integer respaces
@torch.no_grad()
def ddpm(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    process: Diffusion,
    *,
    clip_x0: bool,
    generator: torch.Generator | None,
    progress: bool,
    recurrence: int = 0,  # Bansal et al. 2023's self-recurrence: redo each step this many more times (0 = off)
) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 Alg. 2 (posterior variance, Eq. 7) on the grid's respaced process (Nichol &
    Dhariwal 2021, Sec. 4); classifier term as the mean shift mu + Sigma * score (Dhariwal & Nichol 2021, Alg. 1).
    recurrence = k re-noises each step's result to the step's own level (`renoise`) and redoes it, k times."""
    d, x, x_prev = process, noise, noise
    for i, t, model_t in _steps(d, x, progress, "ddpm"):
        for r in range(recurrence + 1):
            if r > 0:
                x = renoise(d, x_prev, t, generator)
            out = eps_fn(x, model_t)
            x0, eps = _x0_and_eps(d, x, t, out, clip_x0, eps_correction=False)
            # a given x_0 (CFG++) is paired with x_t re-noised along its eps; otherwise that point is x_t itself
            x_t = x if out.x0 is None else gather(d.abar.sqrt(), t, x) * x0 + gather((1 - d.abar).sqrt(), t, x) * eps
            mean, var = d.posterior(x0, x_t, t)
            if out.score is not None:
                mean = mean + var * out.score
            if i > 0:
                mean = mean + var.sqrt() * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x_prev = mean
        x = x_prev
    return x


@SAMPLERS.register(
    steps=50, spacing="linspace", eta=Range(0, 1, "0 = deterministic DDIM, 1 = DDPM-like noise"), recurrence=RECURRENCE
)
@torch.no_grad()
def ddim(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    process: Diffusion,
    *,
    clip_x0: bool,
    generator: torch.Generator | None,
    progress: bool,
    eta: float = 0.0,  # 0 = deterministic DDIM, 1 = DDPM-like noise (Song et al. 2021, Eq. 16)
    recurrence: int = 0,  # Bansal et al. 2023's self-recurrence: redo each step this many more times (0 = off)
) -> torch.Tensor:
    """DDIM, Song et al. 2021 Eq. 12 with sigma from Eq. 16 (eta = 0 deterministic, eta = 1 DDPM-like);
    classifier term as eps - sqrt(1 - abar_t) * score (Dhariwal & Nichol 2021, Alg. 2). recurrence = k re-noises
    each step's result to the step's own level (`renoise`) and redoes it, k times (Bansal et al. 2023, Alg. 1)."""
    d, x, x_prev = process, noise, noise
    for i, t, model_t in _steps(d, x, progress, "ddim"):
        for r in range(recurrence + 1):
            if r > 0:
                x = renoise(d, x_prev, t, generator)
            x0, eps = _x0_and_eps(d, x, t, eps_fn(x, model_t), clip_x0)
            abar_prev = gather(d.abar_prev, t, x)
            sigma = eta * ((1 - abar_prev) / (1 - gather(d.abar, t, x)) * (1 - gather(d.alphas, t, x))).sqrt()
            x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and i > 0:
                x_prev = x_prev + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x = x_prev
    return x


@SAMPLERS.register(steps=20, spacing="logsnr")  # evenly spaced log(alpha/sigma): their choice for small images
@torch.no_grad()
def dpmpp_2m(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    process: Diffusion,
    *,
    clip_x0: bool,
    generator: torch.Generator | None,
    progress: bool,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models"), Alg. 2: the multistep second-order solver of the probability-flow ODE in the data prediction x_0.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_next - lambda and
    r = h_prev / h, the step x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D with
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev (D = x0 at the first step) is written here as
    x_next = alpha_next x0 + sigma_next eps - alpha_next (e^{-h} - 1) (D - x0),
    which is the same update (x = alpha x0 + sigma eps) and lets a guided x0 and eps (CFG++, the classifier's eps
    correction) enter as in DDIM: the first-order part is exactly DDIM(eta=0). The last step, to sigma = 0, is first
    order (x_0 itself), as diffusers' `lower_order_final` does."""
    d, x = process, noise
    lam = log_snr(d.abar)
    x0_prev, h_prev = None, None
    for i, t, model_t in _steps(d, x, progress, "dpmpp_2m"):
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


@SAMPLERS.register(steps=10, spacing="logsnr")  # 10 timesteps: 2 * 10 - 2 = 18 network evaluations per pass
@torch.no_grad()
def heun(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    process: Diffusion,
    *,
    clip_x0: bool,
    generator: torch.Generator | None,
    progress: bool,
) -> torch.Tensor:
    """Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"), Alg. 1: deterministic
    Heun steps of the probability-flow ODE dx/dsigma = eps in x = x_t / sqrt(abar), sigma = sqrt((1 - abar) / abar).
    Each step is Euler's, x' = x0 + sigma' eps (DDIM in these variables), then, unless sigma' = 0, corrected with the
    slope at x': x' += (sigma' - sigma) (eps' - eps) / 2. A grid of n timesteps costs 2 n - 1 network evaluations
    (2 n - 2 where its first step starts above SIGMA_MAX, as every grid from t = T - 1 does).

    The correction is (sigma' - sigma) (eps' - eps) / 2 = (sigma / sigma' - 1) (D' - D) / 2 in the data predictions D of
    the two evaluations: it extrapolates their difference by half the step's sigma ratio, which Karras et al.'s
    schedules bound (they start at sigma_max = 80, SIGMA_MAX). A grid's first step, where it starts above SIGMA_MAX
    (from t = T - 1: sigma = 158 on the linear schedule, 2e4 on the capped cosine one), enters that schedule from
    outside it and is taken as the Euler step alone: there the correction extrapolated D' - D by 125, and an
    eps-prediction model's D at abar = 2.4e-9 (recovered from eps with the factor 1 / sqrt(abar) = 2e4) turned every
    unguided cosine-schedule sample into noise (FID 177 against DDIM's 10; docs/results.md, "Classifier guidance on
    every schedule").

    Guidance terms that displace the data prediction (a classifier's score, an x0_shift) are held constant over the
    step, as DDIM's update holds the data prediction constant: the displacement of the step's first evaluation is added
    to the second evaluation's data prediction in place of that evaluation's own (whose classifier pass goes unused), so
    that the correction extrapolates the model's own change only, not the difference of two noise levels' classifier
    terms."""
    d, x = process, noise
    sigma, model_t = ((1 - d.abar) / d.abar).sqrt(), d.model_t.to(x.device)
    for i, t, t_model in _steps(d, x, progress, "heun"):
        x0, eps, shift = _guided_shift(d, x, t, eps_fn(x, t_model), clip_x0)
        abar_next = gather(d.abar_prev, t, x)
        x_next = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps
        if i > 0 and not (i == d.num_steps - 1 and float(sigma[i]) > SIGMA_MAX):  # the entry step: Euler alone
            out = eps_fn(x_next, model_t[t - 1])
            if shift is None:
                _, eps_next = _x0_and_eps(d, x_next, t - 1, out, clip_x0)
            else:  # the step's displacement, held: the second classifier term is not used
                x0_next, _ = _x0_and_eps(d, x_next, t - 1, Guided(out.eps, x0=out.x0), clip_x0)
                eps_next = d.eps_from_x0(x_next, t - 1, x0_next + shift)
            slope_change = (gather(sigma, t - 1, x) - gather(sigma, t, x)) * (eps_next - eps) / 2
            x_next = x_next + abar_next.sqrt() * slope_change
        x = x_next
    return x


def sample(
    name: str,
    eps_fn: EpsFn,
    diffusion: Diffusion,
    noise: torch.Tensor,
    steps: int | None,
    spacing: str,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **params,
) -> torch.Tensor:
    """Run sampler `name` (its own keys in `params`) from `noise` over the grid `timesteps(diffusion, steps, spacing)`
    of the model's T-step process."""
    entry = SAMPLERS.get_entry(name)
    SAMPLERS.check(name, params)
    process = diffusion.respace(timesteps(diffusion, steps, spacing))
    return entry.fn(eps_fn, noise, process, clip_x0=clip_x0, generator=generator, progress=progress, **params)
