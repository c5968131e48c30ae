"""CFG-like guidance: modes that combine two predictions of the diffusion model itself (conditional and unconditional,
or a random class, or a weaker guide) in the form eps_u + s (eps_c - eps_u) and its 2022-2025 variants. Each mode's
tensor algebra is a pure function here, tested on constructed tensors; variants that work on the denoised image get
x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) at the model's own timestep and hand eps back."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from guidelab.errors import GuidelabError
from guidelab.guidance.core import MODES, Context, cfg_combine, in_interval
from guidelab.guided import EpsFn, Guided
from guidelab.registry import Above, OneOf, Range

BASE = OneOf(("uncond", "cond"), "uncond = eps(x_t, null), cond = eps(x_t, y)")
SIGMA = Range(0, math.inf, "sigma = sqrt((1 - abar_t) / abar_t) >= 0")
INTERVAL_TOP = Above("sigma_lo", "guidance.sigma_lo=0.28 guidance.sigma_hi=5.42")


# ---------------------------------------------------------------- the algebra of each mode, on plain tensors
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
    sample, the multiple of eps_u closest to eps_c in least squares. CFG-Zero* is then cfg_combine(s* eps_u, eps_c,
    s)."""
    u, c = eps_uncond.double().flatten(1), eps_cond.double().flatten(1)
    return ((u * c).sum(1) / (u * u).sum(1).clamp(min=1e-12)).view(-1, *[1] * (eps_cond.dim() - 1)).to(eps_cond.dtype)


def tangential_uncond(eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
    """TCFG's filtered unconditional prediction, Kwon et al. 2025 ("TCFG: Tangential Damping Classifier-free Guidance",
    arXiv 2503.18137), Sec. 3: per sample, the SVD of the 2 x D matrix [eps_c; eps_u] gives the top right singular
    vector v1 (the direction both predictions share); eps_u is replaced by its projection (<eps_u, v1>) v1, which drops
    its tangential part. Parallel predictions are rank one: eps_u is returned unchanged (TCFG is then CFG)."""
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


# ---------------------------------------------------------------- the modes: builders of eps-functions
@MODES.register(scale=None, w=False, base=BASE, uses="base", attributes=True)
def _none(ctx: Context, base: str = "cond") -> EpsFn:
    """eps(x_t, y) (base=cond, the conditional model) or eps(x_t, null) (base=uncond): no guidance."""
    labels = ctx.base_labels(base)
    return lambda x, t: Guided(ctx.unet(x, t, labels))


@MODES.register(attributes=True)
def _cfg(ctx: Context) -> EpsFn:
    """eps_u + s (eps_c - eps_u), cond and uncond as one doubled batch (Ho & Salimans 2022, Eq. 6)."""
    return lambda x, t: Guided(ctx.cfg(x, t, ctx.scale_at(t)))


@MODES.register(scale=Range(1, math.inf, "the CFG strength the one pass stands for: beta = 1 / s"), uses=("cond",))
def _gft(ctx: Context) -> EpsFn:
    """One pass of a network trained by guidance-free training (Chen et al. 2025, "Visual Generation Without
    Guidance"; train.guidance_free=gft): eps_s(x_t, y, beta) with beta = 1 / s, trained to equal CFG at scale s, at
    the cost of the conditional model alone (guidelab.diffusion.gft_loss). Refused for a network without the beta
    input. A model-guidance network (train.guidance_free=mg) needs no mode: guidance=none base=cond is its one pass."""
    if getattr(ctx.unet, "beta_embed", None) is None:
        raise GuidelabError(
            "guidance=gft needs a network trained with train.guidance_free=gft model.beta_embed=true (it takes GFT's "
            "beta input); sample any other network with guidance=cfg"
        )
    return lambda x, t: Guided(ctx.unet(x, t, ctx.y, beta=1 / ctx.scale_at(t)))


@MODES.register(
    needs=("diffusion",),
    phi=Range(0, 1, "0 = plain CFG, 1 = fully rescaled (Lin et al. use 0.7)"),
    space=OneOf(("x0", "eps"), "x0 is the paper's form"),
)
def _cfg_rescale(ctx: Context, phi: float = 0.7, space: str = "x0") -> EpsFn:
    """CFG, then `rescale_combine` (Lin et al. 2023, Sec. 3.4) with weight phi. space=x0 rescales the denoised image,
    the paper's form (it rescales x0 / v predictions); space=eps rescales the noise prediction, diffusers' form."""

    def eps_fn(x, t):
        s = ctx.scale_at(t)
        if s == 1:  # CFG is the conditional prediction: nothing to rescale
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        eps = cfg_combine(eps_u, eps_c, s)
        if space == "eps":
            return Guided(rescale_combine(eps, eps_c, phi))
        return Guided(ctx.to_eps(x, t, rescale_combine(ctx.to_x0(x, t, eps), ctx.to_x0(x, t, eps_c), phi)))

    return eps_fn


@MODES.register(needs=("diffusion",), sigma_lo=SIGMA, sigma_hi=INTERVAL_TOP, attributes=True)
def _cfg_interval(ctx: Context, sigma_lo: float = 0.28, sigma_hi: float = 5.42) -> EpsFn:
    """CFG where sigma in (sigma_lo, sigma_hi], the conditional prediction elsewhere (Kynkaanniemi et al. 2024;
    defaults: their ImageNet-512 interval)."""

    def eps_fn(x, t):
        s = ctx.scale_at(t)
        inside = in_interval(ctx.abar_t(x, t), sigma_lo, sigma_hi)
        if inside.all():
            return Guided(ctx.cfg(x, t, s))
        if not inside.any():  # one pass, the conditional model
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(torch.where(inside, cfg_combine(eps_u, eps_c, s), eps_c))

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
        s = ctx.scale_at(t)
        eps_u, eps_c = ctx.pair(x, t)
        x0, state["running"] = apg_combine(
            ctx.to_x0(x, t, eps_u), ctx.to_x0(x, t, eps_c), s, eta, norm_threshold, state["running"], momentum
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
        s = ctx.scale_at(t)
        if s == 0:
            return Guided(ctx.unet(x, t, ctx.null))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(eps_u, x0=ctx.to_x0(x, t, cfg_combine(eps_u, eps_c, s)))

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
        s = ctx.scale_at(t)
        if len(levels) < zero_init_steps and int(t[0]) not in levels:
            levels.append(int(t[0]))
        if int(t[0]) in levels:
            x0 = torch.zeros_like(x)
            return Guided(ctx.to_eps(x, t, x0), x0=x0)
        if s == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(cfg_combine(zero_star_scale(eps_u, eps_c) * eps_u, eps_c, s))

    return eps_fn


@MODES.register()
def _tcfg(ctx: Context) -> EpsFn:
    """Tangential CFG, Kwon et al. 2025 (arXiv 2503.18137): CFG with eps_u replaced by `tangential_uncond`, its
    projection on the top singular direction of [eps_c, eps_u]: eps = eps_u' + s (eps_c - eps_u'). s = 1 is the
    conditional model."""

    def eps_fn(x, t):
        s = ctx.scale_at(t)
        if s == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(cfg_combine(tangential_uncond(eps_u, eps_c), eps_c, s))

    return eps_fn


@MODES.register(alpha=Range(0, math.inf, "0 = plain CFG; larger damps more where the update is large"))
def _mambo(ctx: Context, alpha: float = 8.0) -> EpsFn:
    """MAMBO-G (arXiv 2508.03442): CFG whose weight is damped per sample by `magnitude_scale`,
    eps = eps_u + w(r) (eps_c - eps_u), w(r) = 1 + (s - 1) exp(-alpha r); alpha = 0 is CFG, s = 1 the conditional
    model."""

    def eps_fn(x, t):
        s = ctx.scale_at(t)
        if s == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        eps_u, eps_c = ctx.pair(x, t)
        return Guided(torch.lerp(eps_u, eps_c, magnitude_scale(eps_u, eps_c, s, alpha)))

    return eps_fn


@MODES.register(seed=Range(0, 2**63 - 1, "seeds the independent classes' own generator"))
def _icg(ctx: Context, seed: int = 0) -> EpsFn:
    """Independent condition guidance (Sadat et al. 2025, Sec. 4): CFG with the unconditional prediction replaced by
    eps(x_t, c) of an independent random class c (`independent_classes`, drawn anew at every call):
    eps = eps(x_t, c) + s (eps(x_t, y) - eps(x_t, c)), both as one doubled batch. It never uses the null class, so it
    guides a model trained without label dropout (model.p_uncond=0). s = 1 is the conditional model."""
    generator = torch.Generator().manual_seed(seed)

    def eps_fn(x, t):
        s = ctx.scale_at(t)
        if s == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        return Guided(cfg_combine(*ctx.pair(x, t, independent_classes(ctx.y, ctx.unet.null_class, generator)), s))

    return eps_fn


@MODES.register(
    low_scale=Range(0, math.inf, "the low-frequency band's s; = scale is CFG"),
    levels=Range(1, 5, "octaves between the bands; 1 splits at half the resolution"),
)
def _fdg(ctx: Context, low_scale: float = 1.0, levels: int = 1) -> EpsFn:
    """Frequency-decoupled guidance (`frequency_combine`): `scale` guides the detail band, `low_scale` the coarse band
    (global layout and colour, where high scales oversaturate and cost diversity). low_scale = scale is CFG;
    both 1 the conditional model."""

    def eps_fn(x, t):
        s = ctx.scale_at(t)
        if s == 1 and low_scale == 1:
            return Guided(ctx.unet(x, t, ctx.y))
        return Guided(frequency_combine(*ctx.pair(x, t), s, low_scale, levels))

    return eps_fn


@MODES.register(
    needs=("diffusion",), percentile=Range(0.5, 1, "the quantile of |x0| that is mapped to 1 (Imagen: 0.995)")
)
def _dynamic_threshold(ctx: Context, percentile: float = 0.995) -> EpsFn:
    """CFG whose denoised image goes through `dynamic_threshold` (Saharia et al. 2022, Sec. 2.3), which keeps large
    scales from saturating; with the sampler's clip_x0 on, quantiles <= 1 make it plain CFG."""

    def eps_fn(x, t):
        s = ctx.scale_at(t)
        eps = ctx.cfg(x, t, s)
        return Guided(ctx.to_eps(x, t, dynamic_threshold(ctx.to_x0(x, t, eps), percentile)))

    return eps_fn


@MODES.register(
    needs=("guide",),
    scale=Range(0, math.inf, "the main model's weight over the guide; 1 = the main model"),
    w=False,
    uses=(),
)
def _autoguidance(ctx: Context) -> EpsFn:
    """Autoguidance, Karras et al. 2024 ("Guiding a Diffusion Model with a Bad Version of Itself"): the CFG form
    D_0 + w (D_1 - D_0) with the unconditional model D_0 replaced by a weaker conditional guide (a smaller network or
    an earlier checkpoint):
    eps = eps_0(x_t, y) + s (eps_1(x_t, y) - eps_0(x_t, y)). With the main model's unconditional half as the guide
    this is CFG; s = 1 is the main model alone."""
    ctx.guide.requires_grad_(False)

    def eps_fn(x, t):
        s = ctx.scale_at(t)
        eps_main = ctx.unet(x, t, ctx.y)
        if s == 1:
            return Guided(eps_main)
        return Guided(cfg_combine(ctx.guide(x, t, ctx.y), eps_main, s))

    return eps_fn
