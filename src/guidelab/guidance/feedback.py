"""Feedback guidance (FBG; Koulischer et al. 2025, "Feedback Guidance of Diffusion Models"): a CFG-like mode whose
scale is not fixed but fed back from the sampling trajectory itself, per sample, through a running estimate of the
log posterior ratio log p(y | x_t) / p(y) between the conditional and the unconditional model. A sample the
conditional model already explains well is guided little; one that drifts away is guided more. The update and the
scale are read from the authors' released sampler (an EDM2 fork); the paper's equation numbers could not be confirmed
offline, and the offset and temperature are written per unit of the model's time t / T (see `_fbg`)."""

from __future__ import annotations

import math

import torch

from guidelab.guidance.core import MODES, Context, cfg_combine
from guidelab.guided import EpsFn, Guided, noise_level
from guidelab.registry import Range

LAMBDA_REF = 3.0  # the reference scale the offset alone reaches at t_0 (the authors' lambda_ref)
ALPHA = 10.0  # the authors' alpha: how strongly the likelihood term can pull at t_1 against the offset
LOG_POSTERIOR_MAX = 3.0  # the authors' upper clamp of the log posterior ratio


def fbg_scale(log_posterior: torch.Tensor, pi: float) -> torch.Tensor:
    """lambda = p / (p - (1 - pi)) with p = exp(log posterior ratio): 1/pi at the start (ratio 1), falling to 1 as
    the posterior grows, rising without bound as it nears 1 - pi (the lower clamp keeps it at the mode's `scale`)."""
    p = log_posterior.exp()
    return p / (p - (1 - pi))


def log_posterior_step(
    log_posterior: torch.Tensor,
    x_edm: torch.Tensor,
    x_next_edm: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    d_uncond: torch.Tensor,
    d_cond: torch.Tensor,
    temp: torch.Tensor | float,
    offset: torch.Tensor | float,
) -> torch.Tensor:
    """One feedback update, in EDM variables (x = x_t / sqrt(abar_t), sigma = sqrt((1 - abar_t) / abar_t), D = the
    denoised prediction): with the stochastic step's kernel N(mu, sigma~^2), sigma~^2 = (sigma^2 - sigma'^2) sigma'^2 /
    sigma^2 and mu_c / mu_u its means under the conditional / unconditional D,
    L' = L - temp / (2 sigma~^2) (||x' - mu_c||^2 - ||x' - mu_u||^2) + offset: the log-likelihood ratio of the step
    actually taken, tempered, plus a constant drift. Unclamped."""
    var = (sigma**2 - sigma_next**2) * sigma_next**2 / sigma**2
    keep, move = sigma_next**2 / sigma**2, (sigma**2 - sigma_next**2) / sigma**2
    mu_c, mu_u = keep * x_edm + move * d_cond, keep * x_edm + move * d_uncond
    diff = ((x_next_edm - mu_c) ** 2).flatten(1).sum(1) - ((x_next_edm - mu_u) ** 2).flatten(1).sum(1)
    return log_posterior - (temp / (2 * var)).reshape(-1) * diff + offset  # var: per sample (B, 1, 1, 1) or one


@MODES.register(
    needs=("diffusion",),
    scale=Range(1, math.inf, "the largest guidance scale FBG may reach (lambda_max; the authors use 10)", open_lo=True),
    w=False,
    pi=Range(0, 1, "the prior weight of the conditional model; the start scale is 1 / pi", open_lo=True),
    t_0=Range(0, 0.99, "the time t / T (1 = noise) by which the offset alone brings the scale to 3"),
    t_1=Range(0, 1, "the time t / T at which the likelihood term's temperature is set"),
)
def _fbg(ctx: Context, pi: float = 0.95, t_0: float = 0.5, t_1: float = 0.4) -> EpsFn:
    """eps_u + lambda (eps_c - eps_u) with lambda = `fbg_scale`(L) per sample, L the running log posterior ratio,
    updated at every call from the previous timestep's predictions and the state the sampler reached
    (`log_posterior_step`) and clamped to [log((1 - pi) s / (s - 1)), 3], so that lambda never exceeds s = `scale`.
    The authors derive the offset and the temperature from t_0 and t_1 for N uniform steps: offset = log((1 - pi)
    lambda_ref / (lambda_ref - 1)) / ((1 - t_0) N) and temp = 2 sigma~^2(t_1) |offset| / alpha (lambda_ref = 3,
    alpha = 10). Here each step gets them for its own length dt = (t - t') / T in place of 1 / N, sigma~^2(t_1) for a
    step of that length at t_1: the same numbers on a uniform grid of the model's time, defined on any grid. The
    predictions that feed an update are those of the last call at the previous timestep (a Heun correction at t'
    is replaced by the corrected state's call). The state lives as long as this eps-function: one batch."""
    diffusion = ctx.diffusion
    T = diffusion.num_steps
    log_min = math.log((1 - pi) * ctx.scale / (ctx.scale - 1))
    offset_total = math.log((1 - pi) * LAMBDA_REF / (LAMBDA_REF - 1)) / (1 - t_0)
    sigmas = noise_level(diffusion.abar)
    state = {"prev": None, "cur": None}  # (t, x, d_u, d_c, log posterior at t) of the last two distinct timesteps

    def sigma_at(tt):
        return sigmas.to(tt.device)[tt].to(torch.float64)

    def eps_fn(x, t):
        t0 = int(t[0])
        if state["cur"] is not None and int(state["cur"][0]) == t0:  # the same timestep again (Heun): redo from prev
            state["cur"] = None
        if state["cur"] is not None:
            state["prev"] = state["cur"]
        log_post = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        if state["prev"] is not None:
            t_a, x_a, du_a, dc_a, log_a = state["prev"]
            dt = (t_a - t0) / T
            t_1_hi = min(T - 1, int(round(t_1 * T)))
            t_1_lo = max(0, int(round(t_1 * T - (t_a - t0))))
            s1, s1n = sigmas[t_1_hi].item(), sigmas[t_1_lo].item()
            var_t1 = (s1**2 - s1n**2) * s1n**2 / s1**2
            offset = offset_total * dt
            temp = 2 * var_t1 * abs(offset) / ALPHA
            s_a, s_b = sigma_at(t.new_full((len(x),), t_a)), sigma_at(t)
            x_edm = x.double() * (1 + s_b**2).sqrt().view(-1, 1, 1, 1)  # x_t / sqrt(abar_t)
            x_a_edm = x_a.double() * (1 + s_a**2).sqrt().view(-1, 1, 1, 1)
            view = (-1, 1, 1, 1)
            log_post = log_posterior_step(
                log_a, x_a_edm, x_edm, s_a.view(view), s_b.view(view), du_a, dc_a, temp, offset
            ).clamp(min=log_min, max=LOG_POSTERIOR_MAX)
        eps_u, eps_c = ctx.pair(x, t)
        lam = fbg_scale(log_post, pi).to(x.dtype).view(-1, 1, 1, 1)
        d_u, d_c = ctx.to_x0(x, t, eps_u).double(), ctx.to_x0(x, t, eps_c).double()
        state["cur"] = (t0, x, d_u, d_c, log_post)
        return Guided(cfg_combine(eps_u, eps_c, lam))

    return eps_fn
