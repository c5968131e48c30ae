"""Guidance modes: each turns the networks and the requested labels into `eps_fn(x_t, t) -> Guided`.

Samplers know nothing about guidance: they call eps_fn and apply what it returns, each in its own form: `eps` the
(guided) noise prediction; `score` an optional classifier term s * grad_x log p_phi(y | x_t) (DDPM: mean shift,
Dhariwal & Nichol 2021 Alg. 1; the others: eps correction, their Alg. 2); `x0` an optional data prediction that
replaces the one implied by eps, `eps` then being only the direction the sampler re-noises along (CFG++).

A mode is one builder `_mode(ctx, **params) -> eps_fn` registered in MODES: its keyword parameters are exactly the keys
of configs/guidance/<mode>.yaml, and the decorator declares the networks it needs besides the UNet, what `scale` means
for it (its range; `w`: whether it is a CFG strength, Ho & Salimans' w = s - 1) and the checks of its values. The
tensor algebra of each variant is a separate pure function, tested on constructed tensors. Variants that work on the
denoised image get x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) at the model's own timestep and hand eps back.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from guidelab.diffusion import Diffusion, _gather
from guidelab.errors import GuidelabError
from guidelab.models.layers import AttentionBlock
from guidelab.registry import Above, OneOf, Range, Registry

CFG_SCALE = Range(0, math.inf, "0 = unconditional, 1 = conditional, > 1 guided (w = s - 1)")
MODES = Registry("guidance", fixed=("ctx",), needs=(), scale=CFG_SCALE, w=True)
# needs: classifier (noisy), clean_classifier (clean, called at t = 0; same slot), guide, diffusion
BASE = OneOf(("uncond", "cond"), "uncond = eps(x_t, null), cond = eps(x_t, y)")
CLASSIFIER_SCALE = Range(0, math.inf, "the classifier gradient's weight (Dhariwal & Nichol's s; 0 = off)")
SIGMA = Range(0, math.inf, "sigma = sqrt((1 - abar_t) / abar_t) >= 0")
INTERVAL_TOP = Above("sigma_lo", "guidance.sigma_lo=0.28 guidance.sigma_hi=5.42")
SCHEDULE = OneOf(("constant", "linear", "cosine"), "how the CFG weight w = s - 1 varies over t (Wang et al. 2024)")


class Guided(NamedTuple):
    eps: torch.Tensor  # the (guided) noise prediction; with x0 given, the direction the sampler re-noises along
    score: torch.Tensor | None = None  # s * grad_x log p(y | x_t) (cg_x0: of log p(y | x0_hat(x_t))), applied by the
    # sampler; None = no classifier term
    x0: torch.Tensor | None = None  # data prediction replacing the one implied by eps (CFG++); None = from eps


EpsFn = Callable[[torch.Tensor, torch.Tensor], Guided]


# ---------------------------------------------------------------- the algebra of each mode, on plain tensors
def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, Eq. 6 with w = s - 1); torch.lerp is exactly this and
    returns eps_u at s = 0 and eps_c at s = 1 bit for bit."""
    return torch.lerp(eps_uncond, eps_cond, scale)


def _per_sample(fn, x: torch.Tensor) -> torch.Tensor:
    return fn(x.flatten(1), dim=1).view(-1, *[1] * (x.dim() - 1))


def rescale_combine(pred_guided: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale, Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Sec. 3.4:
    x_rescaled = x_cfg * std(x_pos) / std(x_cfg);  x_final = phi x_rescaled + (1 - phi) x_cfg,
    std over each sample's pixels. phi = 0 is plain CFG; phi = 1 matches the conditional prediction's std."""
    std_ratio = _per_sample(torch.std, pred_cond) / _per_sample(torch.std, pred_guided).clamp(min=1e-12)
    return torch.lerp(pred_guided, pred_guided * std_ratio, phi)


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of v with respect to `onto`, per sample: v_par = (<v, u>) u with u = onto / ||onto||
    (Sadat et al. 2024's decomposition of the guidance update against the conditional prediction)."""
    unit = F.normalize(onto.double().flatten(1), dim=1)
    parallel = ((v.double().flatten(1) * unit).sum(1, keepdim=True) * unit).view_as(v).to(v.dtype)
    return parallel, v - parallel


def apg_combine(
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    scale: float,
    eta: float = 0.0,
    norm_threshold: float | None = None,
    running: torch.Tensor | None = None,
    momentum: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive projected guidance, Sadat et al. 2024 ("Eliminating Oversaturation and Artifacts of High Guidance
    Scales in Diffusion Models"), on denoised predictions D:
      dD = D_c - D_u, plus momentum: dD <- dD + beta * dD_prev (the running sum `running`, beta < 0 in the paper);
      dD <- dD * min(1, r / ||dD||) (norm threshold r);
      D = D_c + (s - 1) (dD_orth + eta * dD_par), dD split against D_c.
    eta = 1, r = inf, beta = 0 is CFG (D_c + (s - 1)(D_c - D_u)). Returns (D, new running sum)."""
    diff = pred_cond - pred_uncond
    if momentum != 0 and running is not None:
        diff = diff + momentum * running
    running = diff
    if norm_threshold is not None:
        norm = _per_sample(torch.linalg.vector_norm, diff)
        diff = diff * torch.clamp(norm_threshold / norm.clamp(min=1e-12), max=1.0)
    parallel, orthogonal = project(diff, pred_cond)
    return pred_cond + (scale - 1) * (orthogonal + eta * parallel), running


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Dynamic thresholding, Saharia et al. 2022 (Imagen), Sec. 2.3: s = max(1, the `percentile` quantile of |x0|)
    per sample; x0 <- clip(x0, -s, s) / s. Where s = 1 this is static thresholding (clip to [-1, 1])."""
    s = _per_sample(lambda v, dim: torch.quantile(v.abs().float(), percentile, dim=dim), x0).clamp(min=1.0)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def zero_star_scale(eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s optimized scale, Fan et al. 2025 (arXiv 2503.18886), Sec. 3: s* = <eps_c, eps_u> / ||eps_u||^2 per
    sample, the multiple of eps_u closest to eps_c in least squares. CFG-Zero* is then cfg_combine(s* eps_u, eps_c, s)."""
    u, c = eps_uncond.double().flatten(1), eps_cond.double().flatten(1)
    return ((u * c).sum(1) / (u * u).sum(1).clamp(min=1e-12)).view(-1, *[1] * (eps_cond.dim() - 1)).to(eps_cond.dtype)


def tangential_uncond(eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
    """TCFG's filtered unconditional prediction, Kwon et al. 2025 ("TCFG: Tangential Damping Classifier-free
    Guidance", arXiv 2503.18137), Sec. 3: per sample, the SVD of the 2 x D matrix [eps_c; eps_u] gives the top right
    singular vector v1 (the direction both predictions share); eps_u is replaced by its projection (<eps_u, v1>) v1, which
    drops its tangential part. Parallel predictions are rank one: eps_u is returned unchanged (TCFG is then CFG)."""
    pair = torch.stack([eps_cond.flatten(1), eps_uncond.flatten(1)], 1).double()  # (B, 2, D)
    v1 = torch.linalg.svd(pair, full_matrices=False).Vh[:, 0]  # (B, D), unit norm; its sign does not matter below
    u = eps_uncond.flatten(1).double()
    return ((u * v1).sum(1, keepdim=True) * v1).view_as(eps_uncond).to(eps_uncond.dtype)


def magnitude_scale(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float, alpha: float) -> torch.Tensor:
    """MAMBO-G's damped weight, Zhu et al. 2025 ("MAMBO-G: Magnitude-Aware Mitigation for Boosted Guidance", arXiv
    2508.03442): w(r) = 1 + (w - 1) exp(-alpha r) with r = ||eps_c - eps_u|| / ||eps_u|| per sample, the guidance
    update's size relative to the prediction (the paper states it on flow velocities; here on eps). alpha = 0 is w."""
    r = _per_sample(torch.linalg.vector_norm, eps_cond - eps_uncond) / _per_sample(
        torch.linalg.vector_norm, eps_uncond
    ).clamp(min=1e-12)
    return 1 + (scale - 1) * torch.exp(-alpha * r)


def independent_classes(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """ICG's condition, Sadat et al. 2025 ("No Training, No Problem: Rethinking Classifier-Free Guidance for Diffusion
    Models", arXiv 2407.02687), Sec. 4: a class drawn uniformly from the K real classes for each sample, independent of
    y and of x_t, so that E over it of p(x_t | c) is p(x_t) and eps(x_t, c) stands in for the unconditional model.
    Drawn on the CPU by `generator` (the sampler's noise stream stays untouched), then moved to y's device."""
    return torch.randint(0, num_classes, tuple(y.shape), generator=generator).to(y.device)


@contextmanager
def time_embedding_perturbed(unet, noise_scale: float, generator: torch.Generator):
    """TSG's perturbed time step, Sadat et al. 2025 ("No Training, No Problem", arXiv 2407.02687), Sec. 5: within the
    block, Gaussian noise of std `noise_scale` (drawn by `generator` on the CPU, a fresh draw per call) is added to
    the UNet's sinusoidal time-step embedding (entries in [-1, 1]) before its MLP, so the network reads x_t at a
    blurred noise level. Removed on exit."""

    def add_noise(module, inputs):
        (features,) = inputs
        noise = torch.randn(tuple(features.shape), generator=generator).to(features)
        return (features + noise_scale * noise,)

    handle = unet.time_embed.mlp.register_forward_pre_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


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
    """SEG's perturbed self-attention, Hong 2024 ("Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy
    Curvature of Attention", arXiv 2408.00760), Sec. 4: the queries, laid out on the H x W grid, blurred by a Gaussian of
    std `sigma` pixels before softmax attention, which blurs the attention logits along the query axis (their energy
    landscape becomes smoother). The blur is separable, with weights exp(-(i - j)^2 / (2 sigma^2)) normalised per output
    pixel over the grid (no padding); sigma = 0 is no blur, and as sigma grows every query tends to their mean, every
    row of the attention map to the same one."""

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


def attention_blocks(unet, names) -> dict[str, torch.nn.Module]:
    """The UNet's self-attention blocks named in `names` (their module paths, e.g. encoder.mid.1; a compiled UNet's
    `_orig_mod.` prefix left out)."""
    blocks = {name.removeprefix("_orig_mod."): m for name, m in unet.named_modules() if isinstance(m, AttentionBlock)}
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise GuidelabError(
            f"guidance.layers {unknown} are not attention blocks of this UNet; its attention blocks: "
            f"{', '.join(blocks) or 'none'}"
        )
    return {n: blocks[n] for n in names}


@contextmanager
def attention_replaced(blocks: dict, attention):
    """Within the block, the chosen attention blocks use `attention` instead of softmax attention; restored after."""
    for block in blocks.values():
        block.attention = attention
    try:
        yield
    finally:
        for block in blocks.values():
            block.attention = None


def lowpass(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The coarse band of a box-filter pyramid with `levels` octaves: x averaged over 2x2 blocks `levels` times (odd
    sizes rounded up: 28 -> 14 -> 7 -> 4), then bilinearly upsampled back; x - lowpass(x) is the detail band, and the
    two sum to x. One octave on 16-32 px images splits at half the resolution. This is not Burt & Adelson's (1983)
    Laplacian pyramid, whose reduce step is a 5-tap Gaussian-like filter: the 2x2 box lets more of the band above
    half the resolution into the coarse band. Which filter the FDG paper uses could not be checked offline."""
    low = x
    for _ in range(levels):
        low = F.avg_pool2d(low, 2, ceil_mode=True)
    return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)


def frequency_combine(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float, low_scale: float, levels: int
) -> torch.Tensor:
    """Frequency-decoupled guidance, Sadat et al. 2025 ("Guidance in the Frequency Domain Enables High-Fidelity Sampling
    at Low CFG Scales", arXiv 2506.19713): the guidance update d = eps_c - eps_u split into a low- and a high-frequency
    band (`lowpass`, a box-filter pyramid), each with its own scale:
    eps = eps_u + low_scale * low(d) + scale * (d - low(d)). The paper states it on the denoised prediction; x0 is
    affine in eps with the same x_t term, so on eps it is the same update. low_scale = scale is CFG."""
    diff = eps_cond - eps_uncond
    low = lowpass(diff, levels)
    return eps_uncond + low_scale * low + scale * (diff - low)


def scheduled_weight(w: float, t_frac: float, schedule: str) -> float:
    """Guidance-weight schedulers, Wang et al. 2024 ("Analysis of Classifier-Free Guidance Weight Schedulers", TMLR),
    Sec. 4, the heuristic increasing ones, each scaled to the constant weight's mean over t in [0, 1] (1 = pure
    noise), so that the weight rises as the noise falls at the same total guidance: linear w_t = 2 w (1 - t),
    cosine w_t = w (1 + cos(pi t)); constant w_t = w. Applied to the CFG weight w = s - 1, so every schedule starts
    from the conditional model at t = 1."""
    if schedule == "linear":
        return 2 * w * (1 - t_frac)
    if schedule == "cosine":
        return w * (1 + math.cos(math.pi * t_frac))
    return w


def noise_level(abar_t: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar_t) / abar_t): the noise-to-signal ratio, the EDM sigma of x_t / sqrt(abar_t)
    (Karras et al. 2022, Sec. 2), in which Kynkaanniemi et al. 2024 state their guidance interval."""
    return ((1 - abar_t) / abar_t).sqrt()


def in_interval(abar_t: torch.Tensor, sigma_lo: float, sigma_hi: float) -> torch.Tensor:
    """Guidance interval, Kynkaanniemi et al. 2024 ("Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models"): the guidance weight is w for sigma in (sigma_lo, sigma_hi] and 1 (the
    conditional prediction) outside. A boolean per sample."""
    sigma = noise_level(abar_t)
    return (sigma > sigma_lo) & (sigma <= sigma_hi)


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
    unet, classifier, diffusion: Diffusion, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, grad_{x_t} log p_phi(y | x0_hat(x_t))) for a clean classifier p_phi (trained on clean images, called at
    t = 0) on the denoised estimate x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps(x_t, labels)) / sqrt(abar_t), the gradient
    taken through the UNet: Bansal et al. 2023 ("Universal Guidance for Diffusion Models"), Sec. 3.1, forward universal
    guidance eps_hat = eps + s sqrt(1 - abar_t) grad_{x_t} l(y, phi(x0_hat)) with the cross-entropy l = -log p_phi, i.e.
    Dhariwal & Nichol's eps correction with grad_{x_t} log p_phi(y | x0_hat(x_t)) in place of the noisy classifier's.
    One UNet pass gives both; the gradient is taken with respect to x_t only (no parameter gradients accumulate) and
    no graph outlives the call."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        eps = unet(x, t, labels)
        x0_hat = diffusion.predict_x0(x, t, eps)
        (grad,) = torch.autograd.grad(log_p(classifier(x0_hat, torch.zeros_like(t)), y).sum(), x)
    return eps.detach(), grad


# ---------------------------------------------------------------- the modes: builders of eps-functions
@dataclass
class Context:
    """What every builder may use: the networks, the labels and the model's own noise schedule."""

    unet: torch.nn.Module
    y: torch.Tensor
    scale: float
    classifier: torch.nn.Module | None = None
    diffusion: Diffusion | None = None  # the model's T-step process (x0-space and interval modes need it)
    guide: torch.nn.Module | None = None  # the weaker model of autoguidance

    @property
    def null(self) -> torch.Tensor:
        return torch.full_like(self.y, self.unet.null_class)

    def abar_t(self, x, t) -> torch.Tensor:
        return _gather(self.diffusion.abar, t, x)

    def to_x0(self, x, t, eps) -> torch.Tensor:
        return self.diffusion.predict_x0(x, t, eps)

    def to_eps(self, x, t, x0) -> torch.Tensor:
        return self.diffusion.eps_from_x0(x, t, x0)

    def pair(self, x, t, other: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps(x_t, other), eps_c) from one doubled batch (cond first); `other` defaults to the null class (eps_u)."""
        other = self.null if other is None else other
        eps_cond, eps_other = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, other])).chunk(2)
        return eps_other, eps_cond

    def away_from(self, x, t, perturbed) -> torch.Tensor:
        """eps_pert + s (eps_c - eps_pert): CFG's form with the conditional model run again inside `perturbed()` (a
        context manager that perturbs the network) as the guiding prediction; perturbed = None or s = 1: eps_c alone."""
        eps_c = self.unet(x, t, self.y)
        if self.scale == 1 or perturbed is None:
            return eps_c
        with perturbed():
            eps_pert = self.unet(x, t, self.y)
        return cfg_combine(eps_pert, eps_c, self.scale)

    def cfg(self, x, t, scale: float) -> torch.Tensor:
        if scale == 0:  # exactly the unconditional model: one pass instead of two
            return self.unet(x, t, self.null)
        if scale == 1:  # exactly the conditional model
            return self.unet(x, t, self.y)
        return cfg_combine(*self.pair(x, t), scale)

    def score(self, x, t, scale: float) -> torch.Tensor | None:
        return None if scale == 0 else scale * classifier_score(self.classifier, x, t, self.y)

    def base_labels(self, base: str) -> torch.Tensor:
        return self.y if base == "cond" else self.null


@MODES.register(scale=None, w=False, base=BASE)
def _none(ctx: Context, base: str = "cond") -> EpsFn:
    """eps(x_t, y) (base=cond, the conditional model) or eps(x_t, null) (base=uncond): no guidance."""
    labels = ctx.base_labels(base)
    return lambda x, t: Guided(ctx.unet(x, t, labels))


@MODES.register()
def _cfg(ctx: Context) -> EpsFn:
    """eps_u + s (eps_c - eps_u), cond and uncond as one doubled batch (Ho & Salimans 2022, Eq. 6)."""
    return lambda x, t: Guided(ctx.cfg(x, t, ctx.scale))


@MODES.register(needs=("classifier",), scale=CLASSIFIER_SCALE, w=False, base=BASE)
def _cg(ctx: Context, base: str = "uncond") -> EpsFn:
    """eps(x_t, null) (base=uncond) or eps(x_t, y) (base=cond) plus the classifier term s * grad log p_phi(y | x_t)
    (Dhariwal & Nichol 2021, Alg. 1 / Alg. 2)."""
    labels = ctx.base_labels(base)
    return lambda x, t: Guided(ctx.unet(x, t, labels), ctx.score(x, t, ctx.scale))


@MODES.register(needs=("clean_classifier", "diffusion"), scale=CLASSIFIER_SCALE, w=False, base=BASE)
def _cg_x0(ctx: Context, base: str = "uncond") -> EpsFn:
    """eps(x_t, null) (base=uncond) or eps(x_t, y) (base=cond) plus the classifier term s * grad log p_phi(y | x0_hat)
    of a clean classifier on the denoised estimate, through the UNet (`x0_classifier_score`, Bansal et al. 2023's
    forward universal guidance). One UNet pass per step, with its input gradient; at s = 0 a plain pass."""
    labels = ctx.base_labels(base)

    def eps_fn(x, t):
        if ctx.scale == 0:  # exactly the base model: no gradient
            return Guided(ctx.unet(x, t, labels))
        eps, grad = x0_classifier_score(ctx.unet, ctx.classifier, ctx.diffusion, x, t, labels, ctx.y)
        return Guided(eps, ctx.scale * grad)

    return eps_fn


@MODES.register(needs=("classifier",), classifier_scale=Range(0, math.inf, "0 = plain CFG"))
def _cfg_cg(ctx: Context, classifier_scale: float = 1.0) -> EpsFn:
    """Both at once: the CFG prediction at `scale` plus the classifier term at `classifier_scale`."""
    return lambda x, t: Guided(ctx.cfg(x, t, ctx.scale), ctx.score(x, t, classifier_scale))


@MODES.register(
    needs=("diffusion",),
    phi=Range(0, 1, "0 = plain CFG, 1 = fully rescaled (Lin et al. use 0.7)"),
    space=OneOf(("x0", "eps"), "x0 is the paper's form"),
)
def _cfg_rescale(ctx: Context, phi: float = 0.7, space: str = "x0") -> EpsFn:
    """CFG, then `rescale_combine` (Lin et al. 2023, Sec. 3.4) with weight phi. space=x0 rescales the denoised image,
    the paper's form (it rescales x0 / v predictions); space=eps rescales the noise prediction, diffusers' form."""

    def eps_fn(x, t):
        if ctx.scale == 1:  # CFG is the conditional prediction: nothing to rescale
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        eps = cfg_combine(eps_u, eps_c, ctx.scale)
        if space == "eps":
            return Guided(rescale_combine(eps, eps_c, phi))
        return Guided(ctx.to_eps(x, t, rescale_combine(ctx.to_x0(x, t, eps), ctx.to_x0(x, t, eps_c), phi)))

    return eps_fn


@MODES.register(needs=("diffusion",), sigma_lo=SIGMA, sigma_hi=INTERVAL_TOP)
def _cfg_interval(ctx: Context, sigma_lo: float = 0.28, sigma_hi: float = 5.42) -> EpsFn:
    """CFG where sigma in (sigma_lo, sigma_hi], the conditional prediction elsewhere (Kynkaanniemi et al. 2024;
    defaults: their ImageNet-512 interval)."""

    def eps_fn(x, t):
        inside = in_interval(ctx.abar_t(x, t), sigma_lo, sigma_hi)
        if inside.all():
            return Guided(ctx.cfg(x, t, ctx.scale))
        if not inside.any():  # one pass, the conditional model
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(torch.where(inside, cfg_combine(eps_u, eps_c, ctx.scale), eps_c))

    return eps_fn


@MODES.register(
    needs=("classifier", "diffusion"), scale=CLASSIFIER_SCALE, w=False, base=BASE, sigma_lo=SIGMA, sigma_hi=INTERVAL_TOP
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
        score = ctx.score(x, t, ctx.scale)
        return Guided(eps, score if score is None or inside.all() else score * inside)

    return eps_fn


@MODES.register(
    needs=("diffusion",),
    eta=Range(0, math.inf, "1 = CFG's parallel part, 0 = none (the paper's choice)"),
    norm_threshold=Range(0, math.inf, "r > 0, or null for no cap", open_lo=True),
    momentum=Range(-0.99, 0.99, "beta; the paper uses negative values such as -0.5"),
)
def _apg(ctx: Context, eta: float = 0.0, norm_threshold: float | None = 4.0, momentum: float = -0.5) -> EpsFn:
    """Adaptive projected guidance on the denoised predictions (`apg_combine`, Sadat et al. 2024). The
    momentum's running sum lives as long as this eps-function: one sampling run."""
    state = {"running": None}

    def eps_fn(x, t):
        eps_u, eps_c = ctx.pair(x, t)
        x0, state["running"] = apg_combine(
            ctx.to_x0(x, t, eps_u), ctx.to_x0(x, t, eps_c), ctx.scale, eta, norm_threshold, state["running"], momentum
        )
        return Guided(ctx.to_eps(x, t, x0))

    return eps_fn


@MODES.register(
    needs=("diffusion",), scale=Range(0, 1, "guidance=cfgpp reads scale as its lambda, e.g. scale=0.6"), w=False
)
def _cfgpp(ctx: Context) -> EpsFn:
    """CFG++, Chung et al. 2024 ("CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models"),
    the guided data prediction x0_u + lambda (x0_c - x0_u), lambda = `scale` in [0, 1], re-noised along the
    unconditional eps_u instead of the guided eps. lambda = 0 is the unconditional model."""

    def eps_fn(x, t):
        if ctx.scale == 0:
            return Guided(ctx.unet(x, t, ctx.null))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(eps_u, x0=ctx.to_x0(x, t, cfg_combine(eps_u, eps_c, ctx.scale)))

    return eps_fn


@MODES.register(
    needs=("diffusion",),
    zero_init_steps=Range(0, math.inf, "the first noise levels of a run whose prediction is zeroed"),
)
def _cfg_zero_star(ctx: Context, zero_init_steps: int = 1) -> EpsFn:  # noise levels zeroed at the start; 0 = off
    """CFG-Zero*, Fan et al. 2025 (arXiv 2503.18886), Sec. 3: eps = s* eps_u + s (eps_c - s* eps_u) with the optimized
    scale s* (`zero_star_scale`), and zero-init at the first `zero_init_steps` noise levels of the run (no network
    call). The paper zeroes the flow velocity, so that the ODE does not move there. Zeroing eps instead would make the
    data prediction x0 = x_t / sqrt(abar_t), which at the first step of the cosine schedule scales the sample by
    hundreds without clip_x0; here the data prediction is zeroed, x0 = 0 with eps = x_t / sqrt(1 - abar_t), so that
    the step keeps x_t up to the factor sqrt((1 - abar_prev) / (1 - abar_t)) (DDIM), with or without clipping.
    s* = 1 and no zero-init is CFG; s = 1 is the conditional model."""
    levels: list[int] = []  # the noise levels seen so far in this run (one per sampler step; Heun's come twice)

    def eps_fn(x, t):
        if len(levels) < zero_init_steps and int(t[0]) not in levels:
            levels.append(int(t[0]))
        if int(t[0]) in levels:
            x0 = torch.zeros_like(x)
            return Guided(ctx.to_eps(x, t, x0), x0=x0)
        if ctx.scale == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(cfg_combine(zero_star_scale(eps_u, eps_c) * eps_u, eps_c, ctx.scale))

    return eps_fn


@MODES.register()
def _tcfg(ctx: Context) -> EpsFn:
    """Tangential CFG, Kwon et al. 2025 (arXiv 2503.18137): CFG with eps_u replaced by `tangential_uncond`, its projection
    on the top singular direction of [eps_c, eps_u]: eps = eps_u' + s (eps_c - eps_u'). s = 1 is the conditional model."""

    def eps_fn(x, t):
        if ctx.scale == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(cfg_combine(tangential_uncond(eps_u, eps_c), eps_c, ctx.scale))

    return eps_fn


@MODES.register(alpha=Range(0, math.inf, "0 = plain CFG; larger damps more where the update is large"))
def _mambo(ctx: Context, alpha: float = 8.0) -> EpsFn:
    """MAMBO-G (arXiv 2508.03442): CFG whose weight is damped per sample by `magnitude_scale`,
    eps = eps_u + w(r) (eps_c - eps_u), w(r) = 1 + (s - 1) exp(-alpha r); alpha = 0 is CFG, s = 1 the conditional model."""

    def eps_fn(x, t):
        if ctx.scale == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(torch.lerp(eps_u, eps_c, magnitude_scale(eps_u, eps_c, ctx.scale, alpha)))

    return eps_fn


@MODES.register(seed=Range(0, 2**63 - 1, "seeds the independent classes' own generator"))
def _icg(ctx: Context, seed: int = 0) -> EpsFn:
    """Independent condition guidance (Sadat et al. 2025, Sec. 4): CFG with the unconditional prediction replaced by
    eps(x_t, c) of an independent random class c (`independent_classes`, drawn anew at every call):
    eps = eps(x_t, c) + s (eps(x_t, y) - eps(x_t, c)), both as one doubled batch. It never uses the null class, so it
    guides a model trained without label dropout (model.p_uncond=0). s = 1 is the conditional model."""
    generator = torch.Generator().manual_seed(seed)

    def eps_fn(x, t):
        if ctx.scale == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        return Guided(
            cfg_combine(*ctx.pair(x, t, independent_classes(ctx.y, ctx.unet.null_class, generator)), ctx.scale)
        )

    return eps_fn


@MODES.register()
def _pag(ctx: Context, layers: tuple = ("encoder.mid.1",)) -> EpsFn:
    """Perturbed-attention guidance (Ahn et al. 2024, Eq. 9 in this codebase's CFG form): the guiding prediction is the
    conditional model with the self-attention of the blocks named in `layers` replaced by `identity_attention`:
    eps = eps_pert + s (eps_c - eps_pert) (PAG's scale is s - 1). No null class is used. With no layers chosen, or
    s = 1, it is the conditional model."""
    blocks = attention_blocks(ctx.unet, layers)
    perturbed = (lambda: attention_replaced(blocks, identity_attention)) if blocks else None
    return lambda x, t: Guided(ctx.away_from(x, t, perturbed))


@MODES.register(sigma=Range(0, math.inf, "std of the query blur in pixels; 0 = none (the conditional model)"))
def _seg(ctx: Context, layers: tuple = ("encoder.mid.1",), sigma: float = 10.0) -> EpsFn:
    """Smoothed energy guidance (Hong 2024, in this codebase's CFG form): the guiding prediction is the conditional
    model with the queries of the attention blocks named in `layers` blurred (`blurred_query_attention`):
    eps = eps_seg + s (eps_c - eps_seg). sigma = 0, no layers, or s = 1 is the conditional model."""
    blocks = attention_blocks(ctx.unet, layers)
    perturbed = (lambda: attention_replaced(blocks, blurred_query_attention(sigma))) if blocks and sigma else None
    return lambda x, t: Guided(ctx.away_from(x, t, perturbed))


@MODES.register(
    low_scale=Range(0, math.inf, "the low-frequency band's s; = scale is CFG"),
    levels=Range(1, 5, "octaves between the bands; 1 splits at half the resolution"),
)
def _fdg(ctx: Context, low_scale: float = 1.0, levels: int = 1) -> EpsFn:
    """Frequency-decoupled guidance (`frequency_combine`): `scale` guides the detail band, `low_scale` the coarse band
    (global layout and colour, where high scales oversaturate and cost diversity). low_scale = scale is CFG;
    both 1 the conditional model."""

    def eps_fn(x, t):
        if ctx.scale == 1 and low_scale == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        return Guided(frequency_combine(*ctx.pair(x, t), ctx.scale, low_scale, levels))

    return eps_fn


@MODES.register(
    noise_scale=Range(0, math.inf, "std of the noise on the sinusoidal time embedding; 0 = none"),
    seed=Range(0, 2**63 - 1, "seeds the embedding noise's own generator"),
)
def _tsg(ctx: Context, noise_scale: float = 1.0, seed: int = 0) -> EpsFn:
    """Time-step guidance (Sadat et al. 2025, Sec. 5, in this codebase's CFG form): the guiding prediction is the
    conditional model with a perturbed time-step embedding (`time_embedding_perturbed`):
    eps = eps_pert + s (eps_c - eps_pert). It needs no null class (and works for base=uncond models alike).
    noise_scale = 0 or s = 1 is the conditional model."""
    generator = torch.Generator().manual_seed(seed)
    perturbed = (lambda: time_embedding_perturbed(ctx.unet, noise_scale, generator)) if noise_scale else None
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
    """Condition-annealed sampling (Sadat et al. 2024): CFG at `scale` whose conditional branch reads the class embedding
    noised by `anneal_condition` with gamma = `cads_gamma`(t / T): strongly noised at high noise levels (diverse
    layouts), the clean condition from tau1 down. The null class's embedding is left alone. Fresh noise per call from
    its own generator. tau1 = 1 (gamma = 1 everywhere) is CFG."""
    generator = torch.Generator().manual_seed(seed)
    num_timesteps = len(ctx.diffusion.abar)
    null = ctx.unet.null_class

    def eps_fn(x, t):
        def noised(module, inputs, out):
            labels, rows = inputs[0], inputs[0] != null
            gamma = cads_gamma(t.float() / num_timesteps, tau1, tau2)
            gamma = gamma.repeat(len(labels) // len(gamma))  # the doubled CFG batch repeats t
            noise = torch.randn(tuple(out.shape), generator=generator).to(out)
            return torch.where(rows[:, None], anneal_condition(out, gamma, noise, noise_scale, psi), out)

        handle = ctx.unet.class_embed.register_forward_hook(noised)
        try:
            return Guided(ctx.cfg(x, t, ctx.scale))
        finally:
            handle.remove()

    return eps_fn


@MODES.register(
    needs=("diffusion",), percentile=Range(0.5, 1, "the quantile of |x0| that is mapped to 1 (Imagen: 0.995)")
)
def _dynamic_threshold(ctx: Context, percentile: float = 0.995) -> EpsFn:
    """CFG whose denoised image goes through `dynamic_threshold` (Saharia et al. 2022, Sec. 2.3), which keeps large
    scales from saturating; with the sampler's clip_x0 on, quantiles <= 1 make it plain CFG."""

    def eps_fn(x, t):
        eps = ctx.cfg(x, t, ctx.scale)
        return Guided(ctx.to_eps(x, t, dynamic_threshold(ctx.to_x0(x, t, eps), percentile)))

    return eps_fn


@MODES.register(
    needs=("guide",), scale=Range(0, math.inf, "the main model's weight over the guide; 1 = the main model"), w=False
)
def _autoguidance(ctx: Context) -> EpsFn:
    """Autoguidance, Karras et al. 2024 ("Guiding a Diffusion Model with a Bad Version of Itself"): the CFG form
    D_0 + w (D_1 - D_0) with the unconditional model D_0 replaced by a weaker conditional guide (a smaller network or
    an earlier checkpoint):
    eps = eps_0(x_t, y) + s (eps_1(x_t, y) - eps_0(x_t, y)). With the main model's unconditional half as the guide
    this is CFG; s = 1 is the main model alone."""
    ctx.guide.requires_grad_(False)

    def eps_fn(x, t):
        eps_main = ctx.unet(x, t, ctx.y)
        if ctx.scale == 1:
            return Guided(eps_main)
        return Guided(cfg_combine(ctx.guide(x, t, ctx.y), eps_main, ctx.scale))

    return eps_fn


NEEDS = {
    "classifier": "a noisy classifier: pass classifier_ckpt=PATH (train one with `python train_classifier.py`)",
    "clean_classifier": "a clean-image classifier: pass classifier_ckpt=PATH (train one with "
    "`python train_classifier.py classifier=clean`)",
    "guide": "a guide network: pass guide_ckpt=PATH (a smaller network or an earlier checkpoint of the same "
    "model, e.g. RUN_DIR/checkpoints/0000500.pt)",
    "diffusion": "the noise schedule: pass diffusion=Diffusion(...)",
}


def check(mode: str, scale: float, params: dict, schedule: str = "constant") -> None:
    """The mode's checks of `scale`, of the weight schedule and of its own keys (before any network is loaded)."""
    entry = MODES.get_entry(mode)
    if entry.traits["scale"] is not None:
        entry.traits["scale"].check("scale", scale, {})
    SCHEDULE.check("schedule", schedule, {})
    if schedule != "constant" and not entry.traits["w"]:
        raise GuidelabError(
            f"schedule={schedule} varies the CFG weight w = s - 1, but guidance={mode}'s scale is not "
            "a CFG weight; use schedule=constant, or a CFG-style mode"
        )
    MODES.check(mode, params)


def make_eps_fn(
    mode: str,
    unet,
    y: torch.Tensor,
    scale: float = 1.0,
    classifier=None,
    diffusion: Diffusion | None = None,
    guide=None,
    schedule: str = "constant",
    **params,
) -> EpsFn:
    """The eps-function of guidance `mode` for labels y; `params` are the mode's own keys (configs/guidance/<mode>.yaml),
    `diffusion` the model's own T-step process (eps-functions get the model's timesteps), `guide` autoguidance's.
    A non-constant `schedule` sets the mode's s = 1 + `scheduled_weight`(s - 1, t / T) before every call (the samplers
    step all samples of a batch together, so t[0] is the batch's t)."""
    entry = MODES.get_entry(mode)
    unknown = set(params) - set(entry.params)
    if unknown:
        raise GuidelabError(f"guidance={mode} got unknown options {sorted(unknown)}; see configs/guidance/{mode}.yaml")
    check(mode, scale, params, schedule)
    given = {"classifier": classifier, "clean_classifier": classifier, "guide": guide, "diffusion": diffusion}
    for need in entry.traits["needs"] + (("diffusion",) if schedule != "constant" else ()):
        if given[need] is None:
            raise GuidelabError(f"guidance={mode} needs {NEEDS[need]}")
    if classifier is not None and {"classifier", "clean_classifier"} & set(entry.traits["needs"]):
        classifier.requires_grad_(False)
    ctx = Context(unet, y, float(scale), classifier, diffusion, guide)
    eps_fn = entry.fn(ctx, **params)
    if schedule == "constant":
        return eps_fn

    def scheduled(x, t):
        ctx.scale = 1 + scheduled_weight(float(scale) - 1, float(t[0]) / len(diffusion.abar), schedule)
        return eps_fn(x, t)

    return scheduled
