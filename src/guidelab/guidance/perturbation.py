"""Perturbation guidance: modes that guide away from the conditional model run again with a perturbed network
(identity or blurred self-attention, a noised time-step embedding, an annealed class embedding), in CFG's form
eps_pert + s (eps_c - eps_pert). They reach the network through its one seam, `UNet.perturbed`, never through its
submodules; the perturbations themselves are pure functions here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from guidelab.guidance.core import MODES, Context
from guidelab.guided import EpsFn, Guided
from guidelab.registry import Above, Range


def cads_gamma(t_frac: torch.Tensor, tau1: float, tau2: float) -> torch.Tensor:
    """CADS's annealing schedule, Sadat et al. 2024 ("CADS: Unleashing the Diversity of Diffusion Models through
    Condition-Annealed Sampling", arXiv 2310.17347), Eq. 5, t in [0, 1] (1 = pure noise): gamma = 1 for t <= tau1,
    (tau2 - t) / (tau2 - tau1) between, 0 for t >= tau2."""
    return ((tau2 - t_frac) / (tau2 - tau1)).clamp(0.0, 1.0)


def anneal_condition(
    emb: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor, noise_scale: float, psi: float
) -> torch.Tensor:
    """CADS's noised condition (Sadat et al. 2024, Eqs. 4 and 6): y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n, then
    rescaled to y's mean and std per sample, y_res = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y), and mixed,
    psi y_res + (1 - psi) y_hat. `emb` (B, D) class embeddings, gamma (B,), noise (B, D) standard normal."""
    g = gamma.view(-1, 1).to(emb.dtype)
    noised = g.sqrt() * emb + noise_scale * (1 - g).sqrt() * noise
    mean, std = emb.mean(1, keepdim=True), emb.std(1, keepdim=True)
    rescaled = (noised - noised.mean(1, keepdim=True)) / noised.std(1, keepdim=True).clamp(min=1e-12) * std + mean
    return psi * rescaled + (1 - psi) * noised


def identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PAG's perturbed self-attention, Ahn et al. 2024 ("Self-Rectifying Diffusion Sampling with Perturbed-Attention
    Guidance", arXiv 2403.17377), Sec. 3.2: the attention map replaced by the identity, softmax(Q K^T / sqrt(d)) -> I,
    so each position keeps its own value, Attn(Q, K, V) = V: the structure the layer would mix in is gone."""
    return v


def blurred_query_attention(sigma: float):
    """SEG's perturbed self-attention, Hong 2024 ("Smoothed Energy Guidance: Guiding Diffusion Models with Reduced
    Energy Curvature of Attention", arXiv 2408.00760), Sec. 4: the queries, laid out on the H x W grid, blurred by a
    Gaussian of std `sigma` pixels before softmax attention, which blurs the attention logits along the query axis
    (their energy landscape becomes smoother). The blur is separable, with weights exp(-(i - j)^2 / (2 sigma^2))
    normalised per output pixel over the grid (no padding); sigma = 0 is no blur, and as sigma grows every query tends
    to their mean, every row of the attention map to the same one."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if sigma == 0:
            return F.scaled_dot_product_attention(q, k, v)
        weights = []
        for n in size:
            d = torch.arange(n, dtype=torch.float64, device=q.device)
            w = torch.exp(-((d[:, None] - d[None, :]) ** 2) / (2 * sigma**2))
            weights.append((w / w.sum(1, keepdim=True)).to(q.dtype))
        grid = q.unflatten(2, size)  # (B, heads, H, W, d)
        blurred = torch.einsum("ih,jw,bmhwd->bmijd", weights[0], weights[1], grid).flatten(2, 3)
        return F.scaled_dot_product_attention(blurred, k, v)

    return attention


def time_noise(noise_scale: float, generator: torch.Generator):
    """TSG's perturbed time step, Sadat et al. 2025 ("No Training, No Problem", arXiv 2407.02687), Sec. 5: Gaussian
    noise of std `noise_scale` (drawn by `generator` on the CPU, a fresh draw per call) added to the sinusoidal
    time-step features (entries in [-1, 1]) before the embedding MLP, so that the network reads x_t at a blurred
    noise level. A `time_features` perturbation for `UNet.perturbed`."""

    def add_noise(features: torch.Tensor) -> torch.Tensor:
        return features + noise_scale * torch.randn(tuple(features.shape), generator=generator).to(features)

    return add_noise


def attention_perturbed(unet, layers, attention):
    """A context-manager factory that runs the UNet with `attention` in the blocks named in `layers` (checked now
    against the network's own list); None with no layers (nothing to perturb)."""
    unet.attention_blocks(layers)
    return (lambda: unet.perturbed(attention=dict.fromkeys(layers, attention))) if layers else None


# ---------------------------------------------------------------- the modes
@MODES.register(uses=())
def _pag(ctx: Context, layers: tuple = ("encoder.mid.1",)) -> EpsFn:
    """Perturbed-attention guidance (Ahn et al. 2024, Eq. 9 in this codebase's CFG form): the guiding prediction is the
    conditional model with the self-attention of the blocks named in `layers` replaced by `identity_attention`:
    eps = eps_pert + s (eps_c - eps_pert) (PAG's scale is s - 1). No null class is used. With no layers chosen, or
    s = 1, it is the conditional model."""
    perturbed = attention_perturbed(ctx.unet, layers, identity_attention)
    return lambda x, t: Guided(ctx.away_from(x, t, perturbed))


@MODES.register(sigma=Range(0, math.inf, "std of the query blur in pixels; 0 = none (the conditional model)"), uses=())
def _seg(ctx: Context, layers: tuple = ("encoder.mid.1",), sigma: float = 10.0) -> EpsFn:
    """Smoothed energy guidance (Hong 2024, in this codebase's CFG form): the guiding prediction is the conditional
    model with the queries of the attention blocks named in `layers` blurred (`blurred_query_attention`):
    eps = eps_seg + s (eps_c - eps_seg). sigma = 0, no layers, or s = 1 is the conditional model."""
    perturbed = attention_perturbed(ctx.unet, layers, blurred_query_attention(sigma))
    perturbed = perturbed if sigma else None  # sigma = 0: no blur (the layers are still checked)
    return lambda x, t: Guided(ctx.away_from(x, t, perturbed))


@MODES.register(
    noise_scale=Range(0, math.inf, "std of the noise on the sinusoidal time embedding; 0 = none"),
    seed=Range(0, 2**63 - 1, "seeds the embedding noise's own generator"),
    uses=(),
)
def _tsg(ctx: Context, noise_scale: float = 1.0, seed: int = 0) -> EpsFn:
    """Time-step guidance (Sadat et al. 2025, Sec. 5, in this codebase's CFG form): the guiding prediction is the
    conditional model with a perturbed time-step embedding (`time_noise`):
    eps = eps_pert + s (eps_c - eps_pert). It needs no null class (and works for base=uncond models alike).
    noise_scale = 0 or s = 1 is the conditional model."""
    generator = torch.Generator().manual_seed(seed)
    perturbed = (lambda: ctx.unet.perturbed(time_features=time_noise(noise_scale, generator))) if noise_scale else None
    return lambda x, t: Guided(ctx.away_from(x, t, perturbed))


@MODES.register(
    needs=("diffusion",),
    tau1=Range(0, 1, "gamma = 1 below this t / T (the clean condition)"),
    tau2=Above("tau1", "guidance.tau1=0.6 guidance.tau2=0.9"),
    noise_scale=Range(0, math.inf, "s of the condition noise (0.25 in the paper)"),
    psi=Range(0, 1, "1 = fully rescaled to the clean embedding's statistics, 0 = not"),
    seed=Range(0, 2**63 - 1, "seeds the condition noise's own generator"),
)
def _cads(
    ctx: Context, tau1: float = 0.6, tau2: float = 0.9, noise_scale: float = 0.25, psi: float = 1.0, seed: int = 0
) -> EpsFn:
    """Condition-annealed sampling (Sadat et al. 2024): CFG at `scale` whose conditional branch reads the class
    embedding noised by `anneal_condition` with gamma = `cads_gamma`(t / T): strongly noised at high noise levels
    (diverse layouts), the clean condition from tau1 down. The null class's embedding is left alone. Fresh noise per
    call from its own generator. tau1 = 1 (gamma = 1 everywhere) is CFG."""
    generator = torch.Generator().manual_seed(seed)
    num_timesteps = len(ctx.diffusion.abar)
    null = ctx.unet.null_class

    def eps_fn(x, t):
        def noised(labels, emb):
            gamma = cads_gamma(t.float() / num_timesteps, tau1, tau2)
            gamma = gamma.repeat(len(labels) // len(gamma))  # the doubled CFG batch repeats t
            noise = torch.randn(tuple(emb.shape), generator=generator).to(emb)
            return torch.where((labels != null)[:, None], anneal_condition(emb, gamma, noise, noise_scale, psi), emb)

        with ctx.unet.perturbed(class_embedding=noised):
            return Guided(ctx.cfg(x, t, ctx.scale_at(t)))

    return eps_fn
