"""Gaussian diffusion: noise schedules, the forward process q(x_t | x_0), the eps loss and the posterior.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", DDPM): beta_t, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s. Index t runs over 0..T-1 (the paper's 1..T). A respaced process (Nichol & Dhariwal
2021, "Improved DDPM", Sec. 4) keeps a subsequence of the original timesteps; `model_t` maps its indices back to the
original timesteps the networks were trained on.

Pure maths: the callers hand it betas (guidelab.schedules turns a `diffusion` config, or a diffusers scheduler config,
into betas); no file is read here. The guidance-free losses are guidelab.losses'.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from guidelab.errors import GuidelabError


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear schedule of Ho et al. 2020, Sec. 4 (beta_1 = 1e-4 .. beta_T = 0.02 at T = 1000), scaled with T as in
    Nichol & Dhariwal 2021 so that other T keep the same total noise."""
    scale = 1000 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s))
    pi/2), beta_t = 1 - abar_t / abar_{t-1}, clipped at 0.999 (their Sec. 3.2)."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def make_betas(schedule: str, num_steps: int) -> torch.Tensor:
    if schedule not in ("linear", "cosine"):
        raise GuidelabError(f"unknown noise schedule {schedule!r}; use diffusion=linear or diffusion=cosine")
    return (linear_betas if schedule == "linear" else cosine_betas)(num_steps)


def scheduler_betas(schedule: dict) -> torch.Tensor:
    """The betas of a diffusers scheduler config's schedule (float64), by DDPMScheduler's definitions: linear
    `linspace(beta_start, beta_end, T)` (in float32 as diffusers computes it, then widened; unlike guidelab's linear
    it is not rescaled with T), scaled_linear `linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (latent diffusion's),
    squaredcos_cap_v2 the cosine schedule of Nichol & Dhariwal 2021, Eq. 17, beta capped at 0.999."""
    T, kind = schedule["num_steps"], schedule["beta_schedule"]
    if kind == "squaredcos_cap_v2":
        return cosine_betas(T)
    if kind == "linear":
        return torch.linspace(schedule["beta_start"], schedule["beta_end"], T, dtype=torch.float32).double()
    start, end = math.sqrt(schedule["beta_start"]), math.sqrt(schedule["beta_end"])
    return (torch.linspace(start, end, T, dtype=torch.float32) ** 2).double()


def log_snr(abar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)), the half log signal-to-noise ratio of x_t (Lu et al.
    2022, "DPM-Solver", Sec. 2); it falls as t grows."""
    return 0.5 * (abar.log() - (1 - abar).log())


def gather(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] in x's dtype (at least float32: the float64 schedule rounded once) on x's device, shaped to broadcast over
    x's (B, C, H, W); a float64 run keeps float64 coefficients."""
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    return a.to(x.device)[t.to(x.device)].to(dtype).view(-1, *([1] * (x.dim() - 1)))


class Diffusion:
    """A discrete Gaussian diffusion process with T steps (buffers in float64 on the CPU, gathered per batch)."""

    def __init__(self, betas: torch.Tensor, model_t: torch.Tensor | None = None):
        self.betas = betas.to(torch.float64)
        self.num_steps = len(betas)
        self.alphas = 1 - self.betas
        self.abar = torch.cumprod(self.alphas, 0)
        self.abar_prev = torch.cat([self.abar.new_ones(1), self.abar[:-1]])
        # Ho et al. 2020, Eq. 7: variance and mean coefficients of q(x_{t-1} | x_t, x_0).
        self.posterior_var = self.betas * (1 - self.abar_prev) / (1 - self.abar)
        self.posterior_coef_x0 = self.betas * self.abar_prev.sqrt() / (1 - self.abar)
        self.posterior_coef_xt = (1 - self.abar_prev) * self.alphas.sqrt() / (1 - self.abar)
        # the timestep the networks see for each index of this (possibly respaced) process
        self.model_t = torch.arange(self.num_steps, device=betas.device) if model_t is None else model_t

    def to(self, device: torch.device | str) -> Diffusion:
        """Move the schedule buffers to `device` once, so gathering them in the training step copies nothing."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def respace(self, keep: torch.Tensor) -> Diffusion:
        """The process on the timesteps `keep` (increasing), betas recomputed so that abar is unchanged on them:
        beta_i = 1 - abar_{S_i} / abar_{S_{i-1}} (Nichol & Dhariwal 2021, Sec. 4); its first step ends at abar = 1."""
        if len(keep) == self.num_steps:
            return self
        keep = keep.to(self.abar.device)
        abar = self.abar[keep]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return Diffusion(1 - abar / abar_prev, model_t=self.model_t[keep])

    # forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4)."""
        return gather(self.abar.sqrt(), t, x0) * x0 + gather((1 - self.abar).sqrt(), t, x0) * noise

    def eps_loss(
        self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """L_simple = E_{t, eps} || eps - eps_theta(x_t, t, y) ||^2 with t uniform (Ho et al. 2020, Eq. 14)."""
        t, noise, x_t = self.noised(x0, generator)
        return F.mse_loss(model(x_t, t, y).float(), noise.float())

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        """(t, eps, x_t) drawn as `eps_loss` draws them: t uniform, then eps, then x_t = q_sample(x0, t, eps)."""
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return t, noise, self.q_sample(x0, t, noise)

    # reverse process
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. 2020, Eq. 4 solved for x_0)."""
        return (x_t - gather((1 - self.abar).sqrt(), t, x_t) * eps) / gather(self.abar.sqrt(), t, x_t)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The inverse of `predict_x0`: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return (x_t - gather(self.abar.sqrt(), t, x_t) * x0) / gather((1 - self.abar).sqrt(), t, x_t)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eqs. 6-7)."""
        mean = gather(self.posterior_coef_x0, t, x_t) * x0 + gather(self.posterior_coef_xt, t, x_t) * x_t
        return mean, gather(self.posterior_var, t, x_t)
