"""Classifier guidance: modes that add the gradient of a classifier's log-probability of the requested class, a
noisy classifier on x_t (Dhariwal & Nichol 2021) or a clean one on the denoised estimate (Bansal et al. 2023), as the
`score` term that each sampler applies in its own form. The gradients are taken with respect to x_t only, the
classifier frozen, no graph kept between steps; their wall time is the classifier's share of a run."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from guidelab.conditions import asked, columns, keep, labels_of
from guidelab.diffusion import Diffusion, linear_betas, log_snr
from guidelab.errors import GuidelabError
from guidelab.guidance.attributes import gaussian_log_likelihood, regressor_grad, sigma_at
from guidelab.guidance.cfg_like import BASE, INTERVAL_TOP, SIGMA
from guidelab.guidance.core import MODES, Context, in_interval
from guidelab.guidance.gradients import classifier_grad, entropy_factor, log_p, tweedie_bound
from guidelab.guided import Counted, EpsFn, Guided
from guidelab.registry import Range

CLASSIFIER_SCALE = Range(0, math.inf, "the classifier gradient's weight (Dhariwal & Nichol's s; 0 = off)")
# the traits of the modes guided by a clean classifier on x0_hat, with a base prediction and Dhariwal & Nichol's s
GUIDES = dict(attributes=True, guides=("classifier", "regressor"))  # the modes that compose guides (`guide_terms`)
ON_X0 = dict(needs=("clean_classifier", "diffusion"), scale=CLASSIFIER_SCALE, w=False, base=BASE, uses="base")


def calibrated_log_p(logits: torch.Tensor, y: torch.Tensor, tau1: float = 1.0, tau2: float = 1.0) -> torch.Tensor:
    """tau1 f_y - logsumexp(tau2 f) per sample: the temperature-calibrated log-probability of Ma et al. 2023
    ("Elucidating the Design Space of Classifier-Guided Diffusion Generation"), a joint temperature tau1 on the chosen
    logit and a marginal one tau2 on the normaliser (their `joint_temperature` and `joint_temperature *
    margin_temperature_discount`; the paper's equation number could not be confirmed offline). tau1 = tau2 = tau is
    log softmax(tau f)[y], computed by `log_p` itself (so tau = 1 is `log_p` bit for bit)."""
    if tau1 == tau2:
        return log_p(logits * tau1 if tau1 != 1 else logits, y)
    f = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return tau1 * f[torch.arange(len(y), device=y.device), y] - torch.logsumexp(tau2 * f, dim=-1)


def x0_classifier_score(
    unet,
    classifier,
    diffusion: Diffusion,
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    y: torch.Tensor,
    timed: Callable = nullcontext,
    objective: Callable = log_p,
    logits_out: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, grad_{x_t} log p_phi(y | x0_hat(x_t))) for a clean classifier p_phi (trained on clean images, called at
    t = 0) on the denoised estimate x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps(x_t, labels)) / sqrt(abar_t), the gradient
    taken through the UNet: Bansal et al. 2023 ("Universal Guidance for Diffusion Models"), Sec. 3.1, forward universal
    guidance eps_hat = eps + s sqrt(1 - abar_t) grad_{x_t} l(y, phi(x0_hat)) with the cross-entropy l = -log p_phi, i.e.
    Dhariwal & Nichol's eps correction with grad_{x_t} log p_phi(y | x0_hat(x_t)) in place of the noisy classifier's.
    One UNet pass gives both; the gradient is taken with respect to x_t only (no parameter gradients accumulate) and
    no graph outlives the call. `timed()` brackets what the gradient adds to the UNet pass: the classifier on x0_hat and
    the backward pass through it and the UNet. `objective` replaces log p (e.g. `calibrated_log_p`); the classifier's
    logits are appended to `logits_out` where one is given."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        eps = unet(x, t, labels)
        with timed():
            x0_hat = diffusion.predict_x0(x, t, eps)
            logits = classifier(x0_hat, torch.zeros_like(t))
            (grad,) = torch.autograd.grad(objective(logits, y).sum(), x)
    if logits_out is not None:
        logits_out.append(logits.detach())
    return eps.detach(), grad


def classifier_term(
    ctx: Context, x: torch.Tensor, t: torch.Tensor, scale: float, entropy_scale: bool = False
) -> torch.Tensor | None:
    """s * grad_x log p_phi(y | x_t) of the noisy classifier, its gradient within `tweedie_bound` (None at s = 0:
    no classifier pass); with `entropy_scale`, s per sample times log(C) / H(p_phi(. | x_t)) (`entropy_factor`, Zheng
    et al. 2022). A request with attributes, labels=any or a NOT composes its guides instead (`guide_terms`)."""
    if ctx.y.dim() == 2 or ctx.negative is not None or ctx.regressor is not None:
        return guide_terms(ctx, x, t, scale, entropy_scale)
    if scale == 0:
        return None
    with ctx.timed():
        grad, logits = classifier_grad(ctx.classifier, x, t, ctx.y)
        grad = tweedie_bound(grad, ctx.abar_t(x, t))
        return scale * grad * entropy_factor(logits) if entropy_scale else scale * grad


def guide_terms(
    ctx: Context, x: torch.Tensor, t: torch.Tensor, scale: float, entropy_scale: bool = False
) -> torch.Tensor | None:
    """Classifier guidance toward a composed condition, a product of experts: p(c_1, ..., c_n | x_t) taken as
    prod_i p(c_i | x_t)^(w_i), whose score is sum_i w_i grad log p(c_i | x_t): the classifier's log-softmax for the
    label (Dhariwal & Nichol 2021) and the regressor's Gaussian log-likelihood for each attribute (`regressor_grad`),
    each gradient within `tweedie_bound` (the bound holds for any condition c). NOT subtracts its fields' terms (a
    factor p(n_j | x_t)^(-w_j)). w_i is weights.<field>, else `scale`; with `entropy_scale` the class term's weight is
    multiplied by the classifier's entropy factor. The guides' wall time counts as the classifier's."""

    def grad_of(name, rows_):
        if name == "label":
            return classifier_grad(ctx.classifier, x, t, labels_of(rows_))
        only = columns(keep(rows_, [name], ctx.unet.null_class), ctx.regressor.attributes)
        return regressor_grad(ctx.regressor, x, t, only)[0], None

    with ctx.timed():
        return composed_score(ctx, ctx.abar_t(x, t), scale, entropy_scale, grad_of)


def composed_score(ctx: Context, abar_t, scale: float, entropy_scale: bool, grad_of: Callable) -> torch.Tensor | None:
    """sum over the fields asked of w_i tweedie_bound(grad log p(c_i | .)), minus the NOT's fields' terms: the
    product of experts of `guide_terms` (on x_t) and of cg_x0's composed request (on x0_hat). `grad_of(field, rows)`
    gives (the gradient of that field's log-likelihood for the condition rows, the classifier's logits or None)."""
    terms = []
    away = asked(ctx.negative, ctx.unet.null_class) if ctx.negative is not None else ()
    for rows_, sign, fields in ((ctx.y, 1, ctx.fields), (ctx.negative, -1, away)):
        for name in fields:
            weight = sign * ctx.weight(name, scale)
            if weight == 0:
                continue
            grad, logits = grad_of(name, rows_)
            if name == "label" and entropy_scale and sign > 0:
                weight = weight * entropy_factor(logits)
            terms.append(weight * tweedie_bound(grad, abar_t))
    return sum(terms) if terms else None


def x0_guide_score(ctx: Context, x: torch.Tensor, t: torch.Tensor, labels, entropy_scale: bool = False) -> tuple:
    """(eps, score) of cg_x0 for a composed request (condition rows, labels=any, a NOT): the product of experts of
    `guide_terms` read on the denoised estimate x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps(x_t, labels)) / sqrt(abar_t)
    by clean guides called at t = 0, the gradients taken with respect to x_t through the UNet (Bansal et al. 2023,
    Sec. 3.1, forward universal guidance, for any differentiable loss): the clean classifier's log p_phi(y | x0_hat)
    for the label, and for each attribute the clean regressor's Gaussian log-likelihood log N(v; r_phi(x0_hat),
    sigma_0^2), sigma_0 its held-out RMSE on clean images (guidance.attributes). One UNet pass with its graph, one
    backward pass per field (each term is bounded on its own, as in `guide_terms`)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        eps = ctx.unet(x, t, labels)
        with ctx.timed():
            x0_hat = ctx.to_x0(x, t, eps)
            zeros = torch.zeros_like(t)

            def grad_of(name, rows_):
                if name == "label":
                    logits = ctx.classifier(x0_hat, zeros)
                    return torch.autograd.grad(log_p(logits, labels_of(rows_)).sum(), x, retain_graph=True)[0], logits
                targets = columns(keep(rows_, [name], ctx.unet.null_class), ctx.regressor.attributes)
                pred = ctx.regressor(x0_hat, zeros).float()
                sigma = sigma_at(ctx.regressor, zeros).to(pred)
                ll = gaussian_log_likelihood(pred, targets.to(pred), sigma)
                return torch.autograd.grad(ll.sum(), x, retain_graph=True)[0], None

            score = composed_score(ctx, ctx.abar_t(x, t).detach(), ctx.scale, entropy_scale, grad_of)
    return eps.detach(), score if score is None else score.detach()


# ---------------------------------------------------------------- the modes


@MODES.register(needs=("classifier", "diffusion"), scale=CLASSIFIER_SCALE, w=False, base=BASE, uses="base", **GUIDES)
def _cg(ctx: Context, base: str = "uncond", entropy_scale: bool = False) -> EpsFn:
    """eps(x_t, null) (base=uncond) or eps(x_t, y) (base=cond) plus the classifier term s * grad log p_phi(y | x_t)
    (Dhariwal & Nichol 2021, Alg. 1 / Alg. 2); entropy_scale=true scales s per sample by log(C) / H(p_phi(. | x_t))
    (Zheng et al. 2022's entropy-driven sampling)."""
    labels = ctx.base_labels(base)
    return lambda x, t: Guided(ctx.unet(x, t, labels), classifier_term(ctx, x, t, ctx.scale, entropy_scale))


@MODES.register(**ON_X0, **GUIDES)
def _cg_x0(ctx: Context, base: str = "uncond", entropy_scale: bool = False) -> EpsFn:
    """eps(x_t, null) (base=uncond) or eps(x_t, y) (base=cond) plus the classifier term s * grad log p_phi(y | x0_hat)
    of a clean classifier on the denoised estimate, through the UNet (`x0_classifier_score`, Bansal et al. 2023's
    forward universal guidance). One UNet pass per step, with its input gradient; at s = 0 a plain pass.
    entropy_scale=true: s per sample times log(C) / H(p_phi(. | x0_hat)) (Zheng et al. 2022). A request with
    attributes, labels=any or a NOT composes the clean guides on x0_hat (`x0_guide_score`: the clean classifier and
    the clean regressor, regressor_ckpt)."""
    labels = ctx.base_labels(base)
    composed = ctx.y.dim() == 2 or ctx.negative is not None or ctx.regressor is not None

    def eps_fn(x, t):
        if composed:
            return Guided(*x0_guide_score(ctx, x, t, labels, entropy_scale))
        if ctx.scale == 0:  # exactly the base model: no gradient
            return Guided(ctx.unet(x, t, labels))
        logits = []
        eps, grad = x0_classifier_score(
            ctx.unet, ctx.classifier, ctx.diffusion, x, t, labels, ctx.y, ctx.timed, logits_out=logits
        )
        grad = tweedie_bound(grad, ctx.abar_t(x, t))
        return Guided(eps, ctx.scale * grad * entropy_factor(logits[0]) if entropy_scale else ctx.scale * grad)

    return eps_fn


@MODES.register(needs=("classifier", "diffusion"), classifier_scale=Range(0, math.inf, "0 = plain CFG"), **GUIDES)
def _cfg_cg(ctx: Context, classifier_scale: float = 1.0) -> EpsFn:
    """Both at once: the CFG prediction at `scale` plus the classifier term at `classifier_scale`."""
    return lambda x, t: Guided(ctx.cfg(x, t, ctx.scale_at(t)), classifier_term(ctx, x, t, classifier_scale))


@MODES.register(
    needs=("classifier", "diffusion"),
    scale=CLASSIFIER_SCALE,
    w=False,
    base=BASE,
    sigma_lo=SIGMA,
    sigma_hi=INTERVAL_TOP,
    uses="base",
    **GUIDES,
)
def _cg_interval(
    ctx: Context, base: str = "uncond", sigma_lo: float = 0.28, sigma_hi: float = 5.42, entropy_scale: bool = False
) -> EpsFn:
    """Classifier guidance only where sigma in (sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024's interval applied to
    the classifier term); elsewhere the base prediction alone. entropy_scale as in cg."""
    labels = ctx.base_labels(base)

    def eps_fn(x, t):
        inside = in_interval(ctx.abar_t(x, t), sigma_lo, sigma_hi)
        eps = ctx.unet(x, t, labels)
        if not inside.any():
            return Guided(eps)
        score = classifier_term(ctx, x, t, ctx.scale, entropy_scale)
        return Guided(eps, score if score is None or inside.all() else score * inside)

    return eps_fn


# ---------------------------------------------------------------- CG as the literature since 2022 makes it
def softplus_copy(net: torch.nn.Module, beta: float) -> tuple[torch.nn.Module, int]:
    """A copy of `net` whose nn.ReLU modules are nn.Softplus(beta), softplus(x; beta) = log(1 + exp(beta x)) / beta,
    and how many were replaced: Ma et al. 2023's smoothing of an off-the-shelf classifier's activations at guidance
    time, which gives its input gradient a smooth landscape (the authors' code swaps a ResNet's ReLUs for
    nn.Softplus(beta) the same way). The network itself, and every other network of the process, keeps its ReLUs; an
    activation called as a function (torch.relu) cannot be reached, which is why guidelab's classifiers hold theirs as
    modules."""
    smooth = copy.deepcopy(net)
    relus = [(parent, name) for parent in smooth.modules() for name, child in parent.named_children()]
    relus = [(parent, name) for parent, name in relus if type(getattr(parent, name)) is torch.nn.ReLU]
    for parent, name in relus:
        setattr(parent, name, torch.nn.Softplus(beta=beta))
    return smooth, len(relus)


def smoothed_guide(classifier, beta: float):
    """The guide of cg_ots: the classifier itself (beta = 0), or its `softplus_copy`, counted into the classifier's own
    tally (`Counted.around`); refused for a classifier without ReLU modules (nothing to smooth)."""
    if beta == 0:
        return classifier
    smooth, replaced = softplus_copy(getattr(classifier, "net", classifier), beta)
    if not replaced:
        raise GuidelabError(
            "guidance.softplus_beta smooths a classifier's ReLUs, but this classifier has none (guidelab's clean "
            "classifier uses SiLU, smooth already); use guidance.softplus_beta=0"
        )
    return classifier.around(smooth) if isinstance(classifier, Counted) else smooth


@functools.lru_cache(maxsize=1)
def _sine_reference() -> tuple[torch.Tensor, torch.Tensor]:
    """(log-SNR, posterior variance) per timestep of the reference process of `sine_boost`: the linear schedule of Ho
    et al. 2020 at T = 1000 (guided-diffusion's, which Ma et al. 2023 sample)."""
    ref = Diffusion(linear_betas(1000))
    return log_snr(ref.abar), ref.posterior_var


def sine_boost(diffusion: Diffusion, t: torch.Tensor, gamma: float, x: torch.Tensor) -> torch.Tensor:
    """k_t = 1 + gamma sin(pi tau / T) max(Sigma) / Sigma_tau per sample (1 at tau = 0): the classifier term's weight
    under Ma et al. 2023's sine schedule, which adds gamma sin(pi tau / T) max(Sigma) to the DDPM variance Sigma_tau
    that multiplies the gradient in the mean shift mu + Sigma g (Dhariwal & Nichol 2021, Alg. 1). The schedule is read
    from the authors' released sampler (max(Sigma): the largest variance met on the way down) on their process, the
    linear schedule at T = 1000 (Sigma = its posterior variance beta~, whose largest is its last). So that a scale means
    the same on every schedule, tau is not the model's timestep but the reference process's timestep at the same noise
    level: the (fractional) tau whose log-SNR equals the model's at t (`_sine_reference`, linear interpolation between
    the integer timesteps, Sigma_tau likewise), clamped to [0, 999] where the model's noise levels reach beyond the
    reference's (the cosine schedule's capped last step: sin(pi 999 / 1000) ~ 0 there). On the reference schedule itself
    tau = t and k_t is the authors' rule; the capped cosine's beta of 0.999 no longer enters max(Sigma) (taken over the
    model's own process it made the boost 44-178 times the linear schedule's). Written as a factor on the score, it
    applies to every sampler's form of the classifier term. gamma = 0: 1. Whether the paper's experiments used only this
    schedule could not be checked offline."""
    if gamma == 0:
        return torch.ones(len(t), 1, 1, 1, device=x.device, dtype=x.dtype)
    ref_lam, ref_var = _sine_reference()
    lam = log_snr(diffusion.abar.cpu())[t.cpu()]
    i = torch.searchsorted(-ref_lam, -lam).clamp(1, len(ref_lam) - 1)  # ref_lam[i - 1] >= lam > ref_lam[i]
    frac = ((ref_lam[i - 1] - lam) / (ref_lam[i - 1] - ref_lam[i])).clamp(0, 1)
    tau = torch.where(lam >= ref_lam[0], torch.zeros_like(frac), i - 1 + frac)
    var_tau = torch.lerp(ref_var[i - 1], ref_var[i], frac).clamp(min=torch.finfo(ref_var.dtype).tiny)
    k = 1 + gamma * torch.sin(math.pi * tau / len(ref_var)) * ref_var.max() / var_tau
    return torch.where(tau == 0, torch.ones_like(k), k).view(-1, 1, 1, 1).to(device=x.device, dtype=x.dtype)


@MODES.register(
    **ON_X0,
    tau1=Range(0, math.inf, "the joint temperature on the chosen logit (1 = uncalibrated)", open_lo=True),
    tau2=Range(0, math.inf, "the marginal temperature on the normaliser (Ma et al.: 0.5 tau1)", open_lo=True),
    softplus_beta=Range(0, math.inf, "0 = the classifier's ReLUs as they are; Ma et al. use 3"),
    gamma=Range(0, math.inf, "the sine schedule's weight; 0 = none (Ma et al. use 0.3)"),
)
def _cg_ots(
    ctx: Context,
    base: str = "uncond",
    tau1: float = 1.0,
    tau2: float = 0.5,
    softplus_beta: float = 0.0,
    gamma: float = 0.3,
    entropy_scale: bool = False,
) -> EpsFn:
    """Off-the-shelf classifier guidance, Ma et al. 2023 ("Elucidating the Design Space of Classifier-Guided Diffusion
    Generation"): a clean classifier read on x0_hat = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1) with
    the calibrated log-probability tau1 f_y - logsumexp(tau2 f) (`calibrated_log_p`), its ReLUs smoothed to
    softplus(beta) in a copy of the guide (`smoothed_guide`; refused for a classifier without ReLUs), and the score
    s k_t grad_{x0_hat} [tau1 f_y - logsumexp(tau2 f)] with the sine schedule k_t (`sine_boost`). As in the authors'
    released sampler the gradient is taken at x0_hat and applied as the x_t score: no backward pass through the UNet
    (cg_x0 takes that one), so a step costs one UNet pass plus the classifier's forward and backward. Defaults are
    their ImageNet values but for softplus (guidelab's clean classifiers use SiLU, smooth already). With tau1 = tau2
    = 1, gamma = 0 it is s grad_{x0} log p_phi(y | x0_hat). entropy_scale as in cg (on the calibrated logits)."""
    labels = ctx.base_labels(base)
    guide = smoothed_guide(ctx.classifier, softplus_beta) if ctx.scale else None

    def objective(logits, y):
        return calibrated_log_p(logits, y, tau1, tau2)

    def eps_fn(x, t):
        eps = ctx.unet(x, t, labels)
        if ctx.scale == 0:
            return Guided(eps)
        with ctx.timed():
            x0_hat = ctx.to_x0(x, t, eps).clamp(-1, 1)
            grad, logits = classifier_grad(guide, x0_hat, torch.zeros_like(t), ctx.y, objective)
            grad = tweedie_bound(grad, ctx.abar_t(x, t))  # it stands in for grad_{x_t} log p(y | x_t)
            score = ctx.scale * sine_boost(ctx.diffusion, t, gamma, x) * grad
            return Guided(eps, score * entropy_factor(logits * tau2) if entropy_scale else score)

    return eps_fn


def backward_delta(classifier, x0_hat: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Delta* = argmin_Delta -log p_phi(y | x0_hat + Delta) by `steps` Adam steps of rate `lr` from Delta = 0: the
    backward universal guidance of Bansal et al. 2023 ("Universal Guidance for Diffusion Models"), Sec. 3.2, with
    the cross-entropy as the loss l. The paper says an m-step gradient descent; Adam and its rate follow a public
    port of the authors' code (optimizer "Adam"), which could not be checked against the paper offline. x0_hat is
    a constant here (no gradient reaches the UNet); the classifier is the clean one, called at t = 0."""
    delta = torch.zeros_like(x0_hat, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    zeros = torch.zeros(len(y), dtype=torch.long, device=y.device)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = -log_p(classifier(x0_hat.detach() + delta, zeros), y).sum()
            (delta.grad,) = torch.autograd.grad(loss, delta)
            optimizer.step()
    return delta.detach()


@MODES.register(
    **ON_X0,
    backward_steps=Range(0, 1000, "Adam steps on Delta per sampling step; 0 = forward guidance alone (cg_x0)"),
    backward_lr=Range(0, math.inf, "the Adam rate of the backward steps, in data units [-1, 1]", open_lo=True),
)
def _cg_universal(ctx: Context, base: str = "uncond", backward_steps: int = 5, backward_lr: float = 0.01) -> EpsFn:
    """Universal guidance, Bansal et al. 2023, Alg. 1 with a clean classifier: forward guidance (cg_x0's term,
    s grad_{x_t} log p_phi(y | x0_hat(x_t)), through the UNet; none at s = 0), then backward guidance on the x0_hat of
    the forward-guided eps^: Delta* = `backward_delta` and eps^ <- eps^ - sqrt(abar_t / (1 - abar_t)) Delta* (Sec. 3.2),
    so that the guided x0 is x0_hat + Delta*. The backward part is handed to the samplers as what it is, a
    displacement of the data prediction (`Guided.x0_shift`), which every sampler adds to its x0, DDPM's posterior mean
    included (handed over as a score, DDPM's mean shift Sigma score applied only a fraction (1 - abar_{t-1})
    sqrt(abar_t) / ((1 - abar_t) sqrt(abar_{t-1})) of it: none at the last step). The forward gradient is projected by
    `tweedie_bound`. Self-recurrence (Sec. 3.3) is the samplers' `recurrence` key (ddim, ddpm), for any mode."""
    labels = ctx.base_labels(base)

    def eps_fn(x, t):
        if ctx.scale == 0:
            eps, score = ctx.unet(x, t, labels), None
        else:
            eps, grad = x0_classifier_score(ctx.unet, ctx.classifier, ctx.diffusion, x, t, labels, ctx.y, ctx.timed)
            score = ctx.scale * tweedie_bound(grad, ctx.abar_t(x, t))
        if backward_steps == 0:
            return Guided(eps, score)
        with ctx.timed():
            abar = ctx.abar_t(x, t)
            guided_eps = eps if score is None else eps - (1 - abar).sqrt() * score
            delta = backward_delta(ctx.classifier, ctx.to_x0(x, t, guided_eps), ctx.y, backward_steps, backward_lr)
        return Guided(eps, score, x0_shift=delta)

    return eps_fn
