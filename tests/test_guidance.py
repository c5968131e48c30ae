"""Guidance eps-functions: the CFG formula and its exact endpoints, one doubled batch, the classifier term, and each
variant's reduction to plain CFG / CG plus its defining property, on constructed tensors."""

import pytest
import torch
import torch.nn.functional as F

from conftest import eps_function
from guidelab.diffusion import Diffusion, linear_betas
from guidelab.errors import GuidelabError
from guidelab.guidance import (
    MODES,
    anneal_condition,
    apg_combine,
    blurred_query_attention,
    cads_gamma,
    cfg_combine,
    classifier_score,
    dynamic_threshold,
    frequency_combine,
    identity_attention,
    in_interval,
    independent_classes,
    lowpass,
    magnitude_scale,
    project,
    rescale_combine,
    scheduled_weight,
    tangential_uncond,
    time_noise,
    tweedie_bound,
    x0_classifier_score,
    zero_star_scale,
)
from guidelab.guided import noise_level

PROCESS = Diffusion(linear_betas(1000))
ABAR = PROCESS.abar


def _bounded(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A classifier gradient as the classifier modes apply it: projected by `tweedie_bound` at the step's abar_t."""
    return tweedie_bound(grad, ABAR[t].view(-1, *[1] * (grad.dim() - 1)).to(grad.dtype))


class ToyUNet(torch.nn.Module):
    """eps depends on x, t and the label (null = 3); counts calls and batch sizes."""

    null_class = 3

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 1)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return x * 0.5 + self.emb(y).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).float() * 1e-3


class ToyClassifier(torch.nn.Module):
    """Linear logits in x (plus a time term): log p(y|x) is smooth and its gradient is known."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, t):
        return self.lin(x.flatten(1)) + t.float().view(-1, 1) * 1e-3


def _inputs(b=6):
    torch.manual_seed(0)
    return torch.randn(b, 1, 2, 2), torch.randint(0, 1000, (b,)), torch.randint(0, 3, (b,))


def test_cfg_combine_endpoints_are_exact_and_formula_holds():
    eps_u, eps_c = torch.randn(100), torch.randn(100)
    assert torch.equal(cfg_combine(eps_u, eps_c, 0.0), eps_u)
    assert torch.equal(cfg_combine(eps_u, eps_c, 1.0), eps_c)
    assert torch.allclose(cfg_combine(eps_u, eps_c, 3.0), eps_u + 3.0 * (eps_c - eps_u), atol=1e-6)


def test_cfg_eps_fn_equals_unconditional_at_0_conditional_at_1():
    unet, (x, t, y) = ToyUNet(), _inputs()
    null = torch.full_like(y, 3)
    assert torch.equal(eps_function("cfg", unet, y, 0.0)(x, t).eps, unet(x, t, null))
    assert torch.equal(eps_function("cfg", unet, y, 1.0)(x, t).eps, unet(x, t, y))


def test_cfg_runs_cond_and_uncond_as_one_doubled_batch():
    unet, (x, t, y) = ToyUNet(), _inputs()
    out = eps_function("cfg", unet, y, 2.5)(x, t)
    assert unet.calls == [2 * len(x)]
    eps_c, eps_u = unet(x, t, y), unet(x, t, torch.full_like(y, 3))
    assert torch.allclose(out.eps, eps_u + 2.5 * (eps_c - eps_u), atol=1e-6)
    assert out.score is None


def test_none_mode_bases():
    unet, (x, t, y) = ToyUNet(), _inputs()
    assert torch.equal(eps_function("none", unet, y, base="cond")(x, t).eps, unet(x, t, y))
    assert torch.equal(eps_function("none", unet, y, base="uncond")(x, t).eps, unet(x, t, torch.full_like(y, 3)))


def test_classifier_score_is_the_gradient_of_log_softmax():
    clf, (x, t, y) = ToyClassifier(), _inputs()
    grad = classifier_score(clf, x, t, y)
    # closed form for linear logits W x + b: d/dx log softmax_y = W_y - sum_k p_k W_k
    p = F.softmax(clf(x, t), -1)
    ref = clf.lin.weight[y] - p @ clf.lin.weight
    assert torch.allclose(grad.flatten(1), ref, atol=1e-5)


def test_cg_guides_the_unconditional_prediction_and_a_small_step_raises_log_p():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    out = eps_function("cg", unet, y, 2.0, classifier=clf, diffusion=PROCESS)(x, t)
    assert torch.equal(out.eps, unet(x, t, torch.full_like(y, 3)))  # base=uncond by default
    assert not any(p.requires_grad for p in clf.parameters())  # frozen classifier
    assert not x.requires_grad and out.score.grad_fn is None  # no graph kept
    logp = lambda z: F.log_softmax(clf(z, t), -1)[torch.arange(len(y)), y]
    assert (logp(x + 1e-2 * out.score) > logp(x)).all()
    cond = eps_function("cg", unet, y, 2.0, classifier=clf, diffusion=PROCESS, base="cond")(x, t)
    assert torch.equal(cond.eps, unet(x, t, y))
    assert torch.allclose(cond.score, 2.0 * _bounded(classifier_score(clf, x, t, y), t))


def test_cg_scale_zero_has_no_classifier_term_and_cfg_cg_uses_both_scales():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    assert eps_function("cg", unet, y, 0.0, classifier=clf, diffusion=PROCESS)(x, t).score is None
    out = eps_function("cfg_cg", unet, y, 3.0, classifier=clf, diffusion=PROCESS, classifier_scale=0.5)(x, t)
    assert torch.allclose(out.eps, eps_function("cfg", unet, y, 3.0)(x, t).eps)
    assert torch.allclose(out.score, 0.5 * _bounded(classifier_score(clf, x, t, y), t))


@pytest.mark.parametrize(
    "mode,kwargs,match",
    [
        ("cg", {}, "needs a noisy classifier: pass classifier_ckpt=PATH"),
        ("cfg_cg", {}, "classifier_ckpt"),
        ("cg_interval", {"diffusion": PROCESS}, "classifier_ckpt"),
        ("foo", {}, "unknown guidance 'foo'; valid: " + ", ".join(sorted(MODES))),
        ("none", {"base": "both"}, "guidance.base must be one of uncond, cond, got 'both'"),
        ("cfg_rescale", {"phi": 0.5}, "noise schedule"),
        ("cfg_rescale", {"diffusion": PROCESS, "space": "v"}, "guidance.space must be one of x0, eps"),
        ("cfg_rescale", {"diffusion": PROCESS, "phi": 1.5}, r"guidance.phi must be in \[0, 1\], got 1.5"),
        ("cfg_interval", {"diffusion": PROCESS, "sigma_lo": 5.0, "sigma_hi": 1.0}, "must be above guidance.sigma_lo"),
        (
            "cfg_interval",
            {"diffusion": PROCESS, "sigma_hi": 0.1},
            r"guidance.sigma_hi \(0.1\) must be above "
            r"guidance.sigma_lo \(0.28\)",
        ),  # the default sigma_lo
        ("cfg", {"phi": 0.5}, "unknown options"),
        ("autoguidance", {}, "guide_ckpt"),
        (
            "cg_x0",
            {"diffusion": PROCESS},
            r"needs a clean-image classifier: pass classifier_ckpt=PATH \(train one with "
            "`python train_classifier.py classifier=clean`",
        ),
        ("cg_x0", {"classifier": ToyClassifier()}, "noise schedule"),
    ],
)
def test_bad_guidance_arguments(mode, kwargs, match):
    unet, (_, _, y) = ToyUNet(), _inputs()
    with pytest.raises(GuidelabError, match=match):
        eps_function(mode, unet, y, 1.0, **kwargs)


@pytest.mark.parametrize(
    "mode,scale,match",
    [
        ("cfg", -1.0, r"scale must be >= 0, got -1; 0 = unconditional"),
        ("cfgpp", 2.0, r"scale must be in \[0, 1\], got 2; guidance=cfgpp reads"),
        ("cg", -0.5, "classifier gradient"),
        ("cg_x0", -0.5, r"scale must be >= 0, got -0.5; the classifier gradient"),
    ],
)
def test_each_mode_checks_its_scale(mode, scale, match):
    with pytest.raises(GuidelabError, match=match):
        eps_function(mode, ToyUNet(), _inputs()[2], scale, classifier=ToyClassifier(), diffusion=PROCESS)


# --- variants: each reduces to plain CFG / CG where its paper says, and has its defining property -------------------


def _x0(x, t, eps):
    a = ABAR[t].float().view(-1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def test_rescale_is_cfg_at_phi_0_and_matches_the_conditional_std_at_phi_1():
    torch.manual_seed(0)
    guided, cond = 3 * torch.randn(5, 1, 4, 4) + 1, torch.randn(5, 1, 4, 4)
    assert torch.equal(rescale_combine(guided, cond, 0.0), guided)
    full = rescale_combine(guided, cond, 1.0)
    assert torch.allclose(full.flatten(1).std(1), cond.flatten(1).std(1), atol=1e-5)
    assert not torch.allclose(full.flatten(1).std(1), guided.flatten(1).std(1), atol=0.1)
    half = rescale_combine(guided, cond, 0.5)
    assert torch.allclose(half, 0.5 * (guided + full), atol=1e-5)


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_cfg_rescale_eps_fn(space):
    unet, (x, t, y) = ToyUNet(), _inputs()
    cfg = eps_function("cfg", unet, y, 3.0)(x, t).eps
    plain = eps_function("cfg_rescale", unet, y, 3.0, diffusion=PROCESS, phi=0.0, space=space)(x, t).eps
    assert torch.allclose(plain, cfg, atol=1e-4)
    full = eps_function("cfg_rescale", unet, y, 3.0, diffusion=PROCESS, phi=1.0, space=space)(x, t).eps
    eps_c = unet(x, t, y)
    pick = (lambda e: _x0(x, t, e)) if space == "x0" else (lambda e: e)
    assert torch.allclose(pick(full).flatten(1).std(1), pick(eps_c).flatten(1).std(1), rtol=1e-3)
    assert torch.equal(eps_function("cfg_rescale", unet, y, 1.0, diffusion=PROCESS, phi=1.0)(x, t).eps, eps_c)


def test_interval_covering_every_noise_level_is_cfg_and_an_empty_one_is_conditional():
    unet, (x, t, y) = ToyUNet(), _inputs()
    everywhere = eps_function("cfg_interval", unet, y, 3.0, diffusion=PROCESS, sigma_lo=0.0, sigma_hi=float("inf"))(
        x, t
    )
    assert torch.equal(everywhere.eps, eps_function("cfg", unet, y, 3.0)(x, t).eps)
    nowhere = eps_function("cfg_interval", unet, y, 3.0, diffusion=PROCESS, sigma_lo=1e8, sigma_hi=2e8)(x, t)
    assert torch.equal(nowhere.eps, unet(x, t, y))


def test_interval_guides_exactly_the_samples_inside_it():
    unet, clf, (x, _, y) = ToyUNet(), ToyClassifier(), _inputs()
    t = torch.tensor([0, 100, 300, 500, 700, 999])
    sigma = noise_level(ABAR[t])
    inside = in_interval(ABAR[t], 0.28, 5.42)
    assert inside.tolist() == ((sigma > 0.28) & (sigma <= 5.42)).tolist() and 0 < inside.sum() < len(t)
    eps = eps_function("cfg_interval", unet, y, 3.0, diffusion=PROCESS)(x, t).eps
    cfg, cond = eps_function("cfg", unet, y, 3.0)(x, t).eps, unet(x, t, y)
    assert torch.allclose(eps[inside], cfg[inside]) and torch.equal(eps[~inside], cond[~inside])
    out = eps_function("cg_interval", unet, y, 2.0, classifier=clf, diffusion=PROCESS)(x, t)
    cg = eps_function("cg", unet, y, 2.0, classifier=clf, diffusion=PROCESS)(x, t)
    assert torch.equal(out.eps, cg.eps)
    assert torch.allclose(out.score[inside], cg.score[inside]) and (out.score[~inside] == 0).all()
    full = eps_function(
        "cg_interval", unet, y, 2.0, classifier=clf, diffusion=PROCESS, sigma_lo=0.0, sigma_hi=float("inf")
    )
    assert torch.equal(full(x, t).score, cg.score)


def test_apg_is_cfg_with_eta_1_no_threshold_no_momentum():
    torch.manual_seed(0)
    d_u, d_c = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    guided, _ = apg_combine(d_u, d_c, 3.0, eta=1.0, norm_threshold=None, momentum=0.0)
    assert torch.allclose(guided, cfg_combine(d_u, d_c, 3.0), atol=1e-5)
    unet, (x, t, y) = ToyUNet(), _inputs()
    apg = eps_function("apg", unet, y, 3.0, diffusion=PROCESS, eta=1.0, norm_threshold=None, momentum=0.0)(x, t).eps
    assert torch.allclose(apg, eps_function("cfg", unet, y, 3.0)(x, t).eps, atol=1e-3)


def test_apg_parts_are_orthogonal_threshold_caps_the_norm_and_momentum_accumulates():
    torch.manual_seed(0)
    d_u, d_c = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    parallel, orthogonal = project(d_c - d_u, d_c)
    assert torch.allclose((orthogonal * d_c).flatten(1).sum(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(parallel + orthogonal, d_c - d_u)
    assert torch.allclose(
        torch.linalg.matrix_rank(torch.stack([parallel.flatten(1)[0], d_c.flatten(1)[0]])), torch.tensor(1)
    )
    # eta = 0 keeps only the orthogonal part: the update is orthogonal to D_c
    guided, _ = apg_combine(d_u, d_c, 5.0, eta=0.0)
    assert torch.allclose(((guided - d_c) * d_c).flatten(1).sum(1), torch.zeros(4), atol=1e-4)
    # the norm threshold caps ||update|| / (s - 1) at r
    guided, _ = apg_combine(d_u, d_c, 5.0, eta=1.0, norm_threshold=0.5)
    assert ((guided - d_c).flatten(1).norm(dim=1) / 4.0 <= 0.5 + 1e-5).all()
    # momentum: the second update uses dD_2 + beta * dD_1
    d_u2 = torch.randn(4, 1, 4, 4)
    _, running = apg_combine(d_u, d_c, 2.0, eta=1.0, momentum=-0.5)
    g2, running2 = apg_combine(d_u2, d_c, 2.0, eta=1.0, running=running, momentum=-0.5)
    assert torch.allclose(running2, (d_c - d_u2) - 0.5 * (d_c - d_u))
    assert torch.allclose(g2, d_c + running2, atol=1e-5)


def test_apg_eps_fn_keeps_its_momentum_across_steps():
    unet, (x, t, y) = ToyUNet(), _inputs()
    with_m = eps_function("apg", unet, y, 3.0, diffusion=PROCESS, eta=1.0, norm_threshold=None, momentum=-0.5)
    without = eps_function("apg", unet, y, 3.0, diffusion=PROCESS, eta=1.0, norm_threshold=None, momentum=0.0)
    assert torch.allclose(with_m(x, t).eps, without(x, t).eps, atol=1e-4)  # first step: nothing accumulated yet
    assert not torch.allclose(with_m(x, t).eps, without(x, t).eps, atol=1e-3)


def test_dynamic_threshold_is_static_clipping_below_1_and_maps_the_quantile_to_1():
    torch.manual_seed(0)
    small = torch.rand(3, 1, 8, 8) * 1.8 - 0.9  # |x0| < 1: unchanged
    assert torch.equal(dynamic_threshold(small, 0.995), small)
    mostly_in = small.clone()
    mostly_in[:, 0, 0, 0] = 3.0  # one outlier per sample: the 90% quantile stays below 1, so static clipping
    assert torch.equal(dynamic_threshold(mostly_in, 0.9), mostly_in.clamp(-1, 1))
    big = 4 * torch.randn(3, 1, 8, 8)
    out = dynamic_threshold(big, 0.9)
    # s = the 90% quantile of |x0| maps to 1: everything above it is clipped to exactly +-1, the rest scales by 1/s
    s = torch.quantile(big.abs().flatten(1), 0.9, dim=1).view(-1, 1, 1, 1)
    assert out.abs().max() <= 1 and torch.allclose(out.abs().flatten(1).amax(1), torch.ones(3))
    assert ((out.abs() == 1).flatten(1).sum(1) >= int(0.1 * 63)).all()
    assert torch.allclose(out[big.abs() <= s], (big / s)[big.abs() <= s], atol=1e-6)
    unet, (x, t, y) = ToyUNet(), _inputs()
    t = torch.zeros_like(t)  # at t = 0, x0 = x_t up to 1%: |x0| < 1 everywhere, so plain CFG
    x = x.clamp(-0.9, 0.9)
    eps = eps_function("dynamic_threshold", unet, y, 3.0, diffusion=PROCESS)(x, t).eps
    assert torch.allclose(eps, eps_function("cfg", unet, y, 3.0)(x, t).eps, atol=1e-3)


def test_cfgpp_is_unconditional_at_0_and_renoises_the_guided_x0_with_eps_u():
    unet, (x, t, y) = ToyUNet(), _inputs()
    null = torch.full_like(y, 3)
    assert torch.equal(eps_function("cfgpp", unet, y, 0.0, diffusion=PROCESS)(x, t).eps, unet(x, t, null))
    out = eps_function("cfgpp", unet, y, 0.6, diffusion=PROCESS)(x, t)
    eps_u, eps_c = unet(x, t, null), unet(x, t, y)
    assert torch.allclose(out.eps, eps_u)
    assert torch.allclose(out.x0, torch.lerp(_x0(x, t, eps_u), _x0(x, t, eps_c), 0.6), rtol=1e-4, atol=1e-3)


class UncondHalf(torch.nn.Module):
    """The main model's unconditional prediction, as a guide network: autoguidance with it is CFG."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y):
        return self.unet(x, t, torch.full_like(y, self.unet.null_class))


def test_autoguidance_with_the_unconditional_model_as_guide_is_cfg():
    unet, (x, t, y) = ToyUNet(), _inputs()
    auto = eps_function("autoguidance", unet, y, 3.0, guide=UncondHalf(unet))(x, t).eps
    assert torch.allclose(auto, eps_function("cfg", unet, y, 3.0)(x, t).eps, atol=1e-6)
    assert torch.equal(eps_function("autoguidance", unet, y, 1.0, guide=ToyUNet())(x, t).eps, unet(x, t, y))
    guide = ToyUNet()
    out = eps_function("autoguidance", unet, y, 2.0, guide=guide)(x, t).eps
    assert torch.allclose(out, guide(x, t, y) + 2.0 * (unet(x, t, y) - guide(x, t, y)), atol=1e-6)
    assert not any(p.requires_grad for p in guide.parameters())


def test_zero_star_scale_is_the_least_squares_multiple_of_eps_u():
    """s* = <eps_c, eps_u> / ||eps_u||^2 per sample (Fan et al. 2025): the residual eps_c - s* eps_u is orthogonal to
    eps_u, no other multiple comes closer to eps_c, and s* = 1 when eps_c = eps_u."""
    torch.manual_seed(0)
    eps_u, eps_c = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    s_star = zero_star_scale(eps_u, eps_c)
    assert s_star.shape == (5, 1, 1, 1)
    residual = eps_c - s_star * eps_u
    assert torch.allclose((residual * eps_u).flatten(1).sum(1), torch.zeros(5), atol=1e-5)
    for k in (0.9, 1.1):
        assert ((eps_c - k * s_star * eps_u).flatten(1).norm(dim=1) > residual.flatten(1).norm(dim=1)).all()
    assert torch.allclose(zero_star_scale(eps_u, eps_u), torch.ones(5, 1, 1, 1))


def test_cfg_zero_star_is_cfg_on_the_scaled_unconditional_prediction():
    """eps = s* eps_u + s (eps_c - s* eps_u); where s* = 1 (eps_c - eps_u orthogonal to eps_u) that is plain CFG, and
    s = 1 is the conditional model."""
    unet, (x, t, y) = ToyUNet(), _inputs()
    eps_u, eps_c = unet(x, t, torch.full_like(y, 3)), unet(x, t, y)
    out = eps_function("cfg_zero_star", unet, y, 2.5, diffusion=PROCESS, zero_init_steps=0)(x, t).eps
    s_star = zero_star_scale(eps_u, eps_c)
    assert torch.allclose(out, s_star * eps_u + 2.5 * (eps_c - s_star * eps_u), atol=1e-5)
    assert (s_star - 1).abs().max() > 0.01 and not torch.allclose(out, eps_function("cfg", unet, y, 2.5)(x, t).eps)
    assert torch.equal(
        eps_function("cfg_zero_star", unet, y, 1.0, diffusion=PROCESS, zero_init_steps=0)(x, t).eps, eps_c
    )
    orthogonal = project(torch.randn_like(eps_u), eps_u)[1]
    assert torch.allclose(zero_star_scale(eps_u, eps_u + orthogonal), torch.ones(len(x), 1, 1, 1), atol=1e-5)


def test_cfg_zero_star_zeroes_the_first_noise_levels_without_calling_the_network():
    """Zeroed in x0 space: the data prediction is 0 and eps = x_t / sqrt(1 - abar_t) (the x_t it implies)."""
    unet, (x, _, y) = ToyUNet(), _inputs()
    eps_fn = eps_function("cfg_zero_star", unet, y, 3.0, diffusion=PROCESS, zero_init_steps=2)
    for step, level in enumerate((999, 899, 899, 799, 699)):  # a level seen twice counts once (Heun's second pass)
        t = torch.full_like(y, level)
        out = eps_fn(x, t)
        zeroed = out.x0 is not None and torch.equal(out.x0, torch.zeros_like(x))
        assert zeroed == (step < 3), step
        if zeroed:
            assert torch.allclose(out.eps, x / (1 - ABAR[level]).sqrt().float(), atol=1e-6)
    assert unet.calls == [2 * len(x)] * 2  # one doubled batch per guided step, none while zeroed
    with pytest.raises(GuidelabError, match="guidance.zero_init_steps must be >= 0, got -1"):
        eps_function("cfg_zero_star", unet, y, 3.0, diffusion=PROCESS, zero_init_steps=-1)


# --- cg_x0: a clean classifier on the denoised estimate, the gradient through the UNet -------------------------------


class TanhUNet(torch.nn.Module):
    """A double-precision UNet stand-in whose eps is nonlinear in x (a conv through tanh), so that the UNet's Jacobian
    enters grad_{x_t} log p(y | x0_hat(x_t)); counts calls and batch sizes."""

    null_class = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)
        self.emb = torch.nn.Embedding(4, 1, dtype=torch.float64)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return torch.tanh(2 * self.conv(x)) + self.emb(y).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).double() * 1e-3


class CleanClassifier(torch.nn.Module):
    """A small double-precision MLP classifier; records the timesteps it is called with."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t)
        return self.net(x.flatten(1)) + t.double().view(-1, 1) * 1e-2


def _x0_inputs():
    x, _, y = _inputs(4)
    return x.double(), torch.tensor([10, 100, 250, 400]), y


def _log_p_of_x0(unet, clf, x, t, labels, y):
    """log p(y | x0_hat(x_t)) per sample, x0_hat in double precision from the schedule."""
    a = ABAR[t].view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * unet(x, t, labels)) / a.sqrt()
    return F.log_softmax(clf(x0, torch.zeros_like(t)), -1)[torch.arange(len(y)), y]


def test_cg_x0_at_scale_0_is_exactly_the_base_model_in_one_plain_pass():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    out = eps_function("cg_x0", unet, y, 0.0, classifier=clf, diffusion=PROCESS)(x, t)
    assert unet.calls == [len(x)] and out.score is None
    assert torch.equal(out.eps, unet(x, t, torch.full_like(y, 3)))
    cond = eps_function("cg_x0", unet, y, 0.0, classifier=clf, diffusion=PROCESS, base="cond")(x, t)
    assert torch.equal(cond.eps, unet(x, t, y)) and cond.score is None


def test_cg_x0_score_is_the_finite_difference_gradient_of_log_p_y_given_x0_hat():
    """score = s * grad_{x_t} log p(y | x0_hat(x_t)), the gradient through the UNet: central differences agree to
    1e-6 relative, with one UNet call (eps and gradient together), the classifier at t = 0 and nothing left behind."""
    unet, clf, (x, t, y) = TanhUNet(), CleanClassifier(), _x0_inputs()
    null = torch.full_like(y, 3)
    out = eps_function("cg_x0", unet, y, 2.0, classifier=clf, diffusion=PROCESS)(x, t)
    assert unet.calls == [len(x)] and all((seen == 0).all() for seen in clf.seen_t)
    assert torch.equal(out.eps, unet(x, t, null))
    assert out.eps.grad_fn is None and out.score.grad_fn is None and not x.requires_grad
    assert not any(p.requires_grad for p in clf.parameters())  # frozen classifier
    assert all(p.grad is None for p in unet.parameters())  # nothing accumulated in the UNet
    h, fd = 1e-5, torch.zeros_like(x)
    for j in range(x[0].numel()):  # samples are independent: one coordinate of every sample at a time
        step = torch.zeros_like(x).flatten(1)
        step[:, j] = h
        step = step.view_as(x)
        diff = _log_p_of_x0(unet, clf, x + step, t, null, y) - _log_p_of_x0(unet, clf, x - step, t, null, y)
        fd.flatten(1)[:, j] = diff.detach() / (2 * h)
    assert ((out.score - 2.0 * fd).abs().max() / (2.0 * fd).abs().max()).item() < 1e-6
    eps_c, score_c = x0_classifier_score(unet, clf, PROCESS, x, t, y, y)  # base=cond: x0_hat from eps(x_t, y)
    assert torch.equal(eps_c, unet(x, t, y)) and not torch.allclose(score_c, out.score / 2.0)


def test_cg_x0_differs_from_the_classifier_on_x_t_and_a_small_step_raises_log_p_y_given_x0_hat():
    unet, clf, (x, t, y) = TanhUNet(), CleanClassifier(), _x0_inputs()
    null = torch.full_like(y, 3)
    score = eps_function("cg_x0", unet, y, 2.0, classifier=clf, diffusion=PROCESS)(x, t).score
    on_x_t = 2.0 * classifier_score(clf, x, torch.zeros_like(t), y)
    assert not torch.allclose(score, on_x_t, rtol=0.1)
    # with eps held constant the gradient would be grad_x0 log p / sqrt(abar_t): the UNet's Jacobian changes it
    a = ABAR[t].view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * unet(x, t, null)) / a.sqrt()
    constant_eps = 2.0 * classifier_score(clf, x0.detach(), torch.zeros_like(t), y) / a.sqrt()
    assert not torch.allclose(score, constant_eps, rtol=0.1)
    before = _log_p_of_x0(unet, clf, x, t, null, y)
    assert (_log_p_of_x0(unet, clf, x + 1e-4 * score, t, null, y) > before).all()


# --- tcfg: the unconditional prediction without its tangential part --------------------------------------------------


def test_tangential_uncond_keeps_the_shared_direction_and_leaves_parallel_predictions_alone():
    """The projection lies on the top right singular vector of [eps_c; eps_u] (the best rank-one fit of the pair) and
    returns eps_u itself when eps_u is a multiple of eps_c (TCFG is then plain CFG)."""
    torch.manual_seed(0)
    eps_u, eps_c = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    out = tangential_uncond(eps_u, eps_c)
    for i in range(4):
        v1 = torch.linalg.svd(torch.stack([eps_c[i].flatten(), eps_u[i].flatten()])).Vh[0]
        assert torch.allclose(out[i].flatten(), (eps_u[i].flatten() @ v1) * v1, atol=1e-5)
        assert torch.linalg.matrix_rank(torch.stack([out[i].flatten(), v1])) == 1
    assert not torch.allclose(out, eps_u, atol=1e-3)
    parallel = -0.7 * eps_c
    assert torch.allclose(tangential_uncond(parallel, eps_c), parallel, atol=1e-6)


def test_tcfg_is_cfg_on_the_projected_unconditional_prediction():
    unet, (x, t, y) = ToyUNet(), _inputs()
    eps_u, eps_c = unet(x, t, torch.full_like(y, 3)), unet(x, t, y)
    unet.calls.clear()
    out = eps_function("tcfg", unet, y, 3.0)(x, t).eps
    assert unet.calls == [2 * len(x)]  # one doubled batch
    assert torch.allclose(out, cfg_combine(tangential_uncond(eps_u, eps_c), eps_c, 3.0), atol=1e-6)
    assert not torch.allclose(out, eps_function("cfg", unet, y, 3.0)(x, t).eps, atol=1e-3)
    assert torch.equal(eps_function("tcfg", unet, y, 1.0)(x, t).eps, eps_c)


# --- mambo: the CFG weight damped by the update's relative size ------------------------------------------------------


def test_magnitude_scale_is_w_at_alpha_0_and_damps_large_updates_more():
    torch.manual_seed(0)
    eps_u = torch.randn(3, 1, 4, 4)
    eps_c = eps_u + torch.tensor([0.01, 0.3, 3.0]).view(3, 1, 1, 1) * torch.randn(3, 1, 4, 4)
    assert torch.equal(magnitude_scale(eps_u, eps_c, 4.0, 0.0), torch.full((3, 1, 1, 1), 4.0))
    w = magnitude_scale(eps_u, eps_c, 4.0, 2.0).flatten()
    r = (eps_c - eps_u).flatten(1).norm(dim=1) / eps_u.flatten(1).norm(dim=1)
    assert torch.allclose(w, 1 + 3 * torch.exp(-2 * r), atol=1e-6)
    assert (
        4.0 > w[0] > w[1] > w[2] > 1.0
    )  # the larger the update relative to eps_u, the nearer to the conditional model


def test_mambo_is_cfg_at_alpha_0_and_damped_cfg_otherwise():
    unet, (x, t, y) = ToyUNet(), _inputs()
    eps_u, eps_c = unet(x, t, torch.full_like(y, 3)), unet(x, t, y)
    cfg = eps_function("cfg", unet, y, 3.0)(x, t).eps
    assert torch.allclose(eps_function("mambo", unet, y, 3.0, alpha=0.0)(x, t).eps, cfg, atol=1e-6)
    out = eps_function("mambo", unet, y, 3.0, alpha=5.0)(x, t).eps
    assert torch.allclose(out, eps_u + magnitude_scale(eps_u, eps_c, 3.0, 5.0) * (eps_c - eps_u), atol=1e-6)
    assert (out - eps_c).norm() < (cfg - eps_c).norm()  # damped: between the conditional model and CFG
    assert torch.equal(eps_function("mambo", unet, y, 1.0)(x, t).eps, eps_c)
    with pytest.raises(GuidelabError, match="guidance.alpha must be >= 0, got -1"):
        eps_function("mambo", unet, y, 3.0, alpha=-1.0)


# --- icg: an independent random class in place of the null class -----------------------------------------------------


def test_icg_is_cfg_when_the_independent_class_is_the_null_class(monkeypatch):
    import guidelab.guidance.cfg_like as guidance

    unet, (x, t, y) = ToyUNet(), _inputs()
    monkeypatch.setattr(guidance, "independent_classes", lambda y, k, g: torch.full_like(y, unet.null_class))
    assert torch.equal(eps_function("icg", unet, y, 3.0)(x, t).eps, eps_function("cfg", unet, y, 3.0)(x, t).eps)


def test_icg_draws_real_classes_independent_of_y_per_call_reproducibly():
    unet, (x, t, y) = ToyUNet(), _inputs(b=400)
    y = torch.zeros_like(y)  # every sample asks for class 0; the independent classes must not follow
    gen = torch.Generator().manual_seed(7)
    draws = torch.stack([independent_classes(y, 3, gen) for _ in range(5)])
    assert set(draws.unique().tolist()) == {0, 1, 2}  # the K = 3 real classes, never the null class 3
    assert (draws[0] != draws[1]).any() and abs((draws == 0).float().mean() - 1 / 3) < 0.05
    # the mode: eps(x_t, c) + s (eps(x_t, y) - eps(x_t, c)) with c from its own seeded generator, one doubled batch
    gen = torch.Generator().manual_seed(5)
    first, second = independent_classes(y, 3, gen), independent_classes(y, 3, gen)
    eps_fn = eps_function("icg", unet, y, 2.0, seed=5)
    for c in (first, second):
        unet.calls.clear()
        expected = cfg_combine(unet(x, t, c), unet(x, t, y), 2.0)
        unet.calls.clear()
        assert torch.allclose(eps_fn(x, t).eps, expected, atol=1e-6) and unet.calls == [2 * len(x)]
    assert torch.equal(eps_function("icg", unet, y, 1.0)(x, t).eps, unet(x, t, y))


# --- pag: the guiding pass with identity self-attention ---------------------------------------------------------------


def _small_unet(attn_resolutions=(), beta_embed=False):
    """A real UNet with random weights everywhere (its zero-initialised output and attention projections, and GFT's
    beta path, too)."""
    from guidelab.models import UNet

    torch.manual_seed(0)
    unet = UNet(
        1,
        8,
        3,
        channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=attn_resolutions,
        dropout=0.0,
        num_heads=2,
        beta_embed=beta_embed,
    ).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return unet


def test_identity_attention_is_softmax_attention_with_the_identity_map():
    """The hook gives what softmax attention gives when each position may attend only to itself (an identity attention
    map); unset, the block is softmax attention again, bit for bit."""
    block = _small_unet().encoder.mid[1]
    x = torch.randn(2, 16, 4, 4)
    before = block(x)
    block.attention = lambda q, k, v, size: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.eye(16).bool())
    masked = block(x)
    block.attention = identity_attention
    assert torch.allclose(block(x), masked, atol=1e-6) and not torch.allclose(masked, before, atol=1e-3)
    block.attention = None
    assert torch.equal(block(x), before)


def test_pag_is_cfg_between_the_conditional_and_the_perturbed_pass_and_no_layers_is_the_conditional_model():
    unet = _small_unet(attn_resolutions=(4,))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eps_c = unet(x, t, y)
        with unet.perturbed(attention=dict.fromkeys(["encoder.mid.1", "up.0.1.1"], identity_attention)):
            eps_pert = unet(x, t, y)
        assert all(b.attention is None for b in unet.attention_blocks().values())  # restored after the guiding pass
        out = eps_function("pag", unet, y, 2.5, layers=["encoder.mid.1", "up.0.1.1"])(x, t).eps
        assert torch.allclose(out, cfg_combine(eps_pert, eps_c, 2.5), atol=1e-6)
        assert (eps_pert - eps_c).abs().max() > 1e-3
        assert torch.equal(eps_function("pag", unet, y, 2.5, layers=[])(x, t).eps, eps_c)
        assert torch.equal(eps_function("pag", unet, y, 1.0)(x, t).eps, eps_c)
    with pytest.raises(
        GuidelabError,
        match=r"guidance.layers \['mid'\] are not attention blocks of this UNet; its "
        r"attention blocks: encoder.blocks.2.1, encoder.mid.1, up.0.0.1, up.0.1.1$",
    ):
        eps_function("pag", unet, y, 2.5, layers=["mid"])


# --- seg: the guiding pass with blurred attention queries -------------------------------------------------------------


def test_blurred_query_attention_is_a_normalised_gaussian_blur_of_the_queries(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 12, 4).unbind(0)  # (B=2, heads=2, 3x4 positions, d=4)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(blurred_query_attention(0.0)(q, k, v, (3, 4)), plain)
    # sigma = 1: the query at (1, 2) is the Gaussian-weighted mean of the grid's queries, weights normalised
    grid = q.unflatten(2, (3, 4))
    ii, jj = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    w = torch.exp(-((ii - 1) ** 2 + (jj - 2) ** 2) / 2)
    blurred_12 = (grid * (w / w.sum())[None, None, :, :, None]).sum((2, 3))
    captured, sdpa = {}, F.scaled_dot_product_attention

    def spy(query, key, value):
        captured["q"] = query
        return sdpa(query, key, value)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    blurred_query_attention(1.0)(q, k, v, (3, 4))
    monkeypatch.undo()
    assert torch.allclose(captured["q"].unflatten(2, (3, 4))[:, :, 1, 2], blurred_12, atol=1e-6)
    # a very wide blur: every query is the mean query
    out = blurred_query_attention(1e4)(q, k, v, (3, 4))
    mean_q = q.mean(2, keepdim=True).expand_as(q)
    assert torch.allclose(out, F.scaled_dot_product_attention(mean_q, k, v), atol=1e-5)


def test_seg_is_cfg_between_the_conditional_and_the_blurred_pass_and_reduces_to_the_conditional_model():
    unet = _small_unet(attn_resolutions=(4,))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eps_c = unet(x, t, y)
        with unet.perturbed(attention={"encoder.mid.1": blurred_query_attention(2.0)}):
            eps_seg = unet(x, t, y)
        out = eps_function("seg", unet, y, 3.0, layers=["encoder.mid.1"], sigma=2.0)(x, t).eps
        assert torch.allclose(out, cfg_combine(eps_seg, eps_c, 3.0), atol=1e-6) and (eps_seg - eps_c).abs().max() > 1e-4
        for params in (dict(layers=[]), dict(sigma=0.0), dict()):
            scale = 1.0 if not params else 3.0
            assert torch.equal(eps_function("seg", unet, y, scale, **params)(x, t).eps, eps_c), params
    with pytest.raises(GuidelabError, match="guidance.sigma must be >= 0, got -1"):
        eps_function("seg", unet, y, 3.0, sigma=-1.0)


# --- fdg: separate scales for the coarse and the detail band ---------------------------------------------------------


def test_lowpass_bands_sum_to_the_input_and_the_coarse_band_is_smooth():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    low = lowpass(x, 1)
    assert low.shape == x.shape and torch.allclose(low + (x - low), x)
    assert torch.allclose(lowpass(torch.full_like(x, 0.7), 2), torch.full_like(x, 0.7))  # constants are all low
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1  # the finest pattern: all detail
    assert lowpass(checker.view(1, 1, 16, 16), 1).abs().max() < 1e-6
    assert lowpass(torch.randn(1, 1, 28, 28), 3).shape == (1, 1, 28, 28)  # odd sizes: 28 -> 14 -> 7 -> 4 and back


def test_fdg_is_cfg_with_equal_scales_and_guides_each_band_by_its_own_scale():
    unet, (x, t, y) = ToyUNet(), _inputs()
    x = torch.randn(len(y), 1, 8, 8)
    eps_u, eps_c = unet(x, t, torch.full_like(y, 3)), unet(x, t, y)
    cfg = eps_function("cfg", unet, y, 3.0)(x, t).eps
    assert torch.allclose(eps_function("fdg", unet, y, 3.0, low_scale=3.0)(x, t).eps, cfg, atol=1e-5)
    out = eps_function("fdg", unet, y, 3.0, low_scale=1.0, levels=1)(x, t).eps
    d = eps_c - eps_u
    assert torch.equal(out, frequency_combine(eps_u, eps_c, 3.0, 1.0, 1))
    assert torch.allclose(out, eps_u + lowpass(d, 1) + 3.0 * (d - lowpass(d, 1)), atol=1e-6)
    unet.calls.clear()
    assert torch.equal(eps_function("fdg", unet, y, 1.0, low_scale=1.0)(x, t).eps, eps_c) and unet.calls == [len(x)]
    with pytest.raises(GuidelabError, match="guidance.levels must be in"):
        eps_function("fdg", unet, y, 3.0, levels=0)


# --- tsg: the guiding pass with a noised time-step embedding ---------------------------------------------------------


def test_tsg_guides_away_from_a_noised_time_embedding_and_reduces_to_the_conditional_model():
    from guidelab.models.layers import timestep_embedding

    unet = _small_unet()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eps_c = unet(x, t, y)
        seen = []
        spy = unet.time_embed.mlp.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))  # the MLP's input
        with unet.perturbed(time_features=time_noise(0.5, torch.Generator().manual_seed(3))):
            eps_pert = unet(x, t, y)
        assert torch.equal(unet(x, t, y), eps_c)  # restored on exit
        spy.remove()
        noise = seen[0] - timestep_embedding(t, unet.time_embed.dim)
        assert torch.allclose(
            noise, 0.5 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(3)), atol=1e-6
        )
        out = eps_function("tsg", unet, y, 2.0, noise_scale=0.5, seed=3)(x, t).eps
        assert (
            torch.allclose(out, cfg_combine(eps_pert, eps_c, 2.0), atol=1e-6) and (eps_pert - eps_c).abs().max() > 1e-4
        )
        assert torch.equal(eps_function("tsg", unet, y, 2.0, noise_scale=0.0)(x, t).eps, eps_c)
        assert torch.equal(eps_function("tsg", unet, y, 1.0)(x, t).eps, eps_c)


# --- cads: the class embedding annealed from noise to clean -----------------------------------------------------------


def test_cads_gamma_and_the_annealed_condition():
    gamma = cads_gamma(torch.tensor([0.0, 0.6, 0.75, 0.9, 1.0]), 0.6, 0.9)
    assert torch.allclose(gamma, torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))
    torch.manual_seed(0)
    emb, noise = 3 * torch.randn(4, 32) + 1, torch.randn(4, 32)
    g = torch.tensor([1.0, 0.5, 0.0, 0.25])
    raw = anneal_condition(emb, g, noise, 0.25, psi=0.0)
    assert torch.allclose(raw, g.sqrt()[:, None] * emb + 0.25 * (1 - g).sqrt()[:, None] * noise)
    assert torch.equal(raw[0], emb[0])  # gamma = 1: the clean condition
    res = anneal_condition(emb, g, noise, 0.25, psi=1.0)  # rescaled to each clean embedding's mean and std
    assert torch.allclose(res.mean(1), emb.mean(1), atol=1e-5) and torch.allclose(res.std(1), emb.std(1), atol=1e-5)
    assert torch.allclose(anneal_condition(emb, g, noise, 0.25, psi=0.3), 0.3 * res + 0.7 * raw, atol=1e-6)


def test_cads_is_cfg_with_a_clean_condition_and_noises_only_the_conditional_branch_above_tau1():
    unet = _small_unet()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    kw = dict(diffusion=PROCESS)
    with torch.no_grad():
        for t in (torch.full((3,), 100), torch.full((3,), 950)):
            cfg = eps_function("cfg", unet, y, 3.0)(x, t).eps
            clean = eps_function("cads", unet, y, 3.0, tau1=1.0, tau2=1.0 + 1e-9, **kw)(x, t).eps
            assert torch.allclose(clean, cfg, atol=1e-5)
            out = eps_function("cads", unet, y, 3.0, **kw)(x, t).eps  # tau1 = 0.6: t = 100 clean, t = 950 pure noise
            assert torch.allclose(out, cfg, atol=1e-5) == (t[0] == 100)
        uncond = unet(x, t, torch.full_like(y, 3))  # the null embedding is never noised
        assert torch.equal(eps_function("cads", unet, y, 0.0, **kw)(x, t).eps, uncond)
        assert torch.equal(eps_function("cfg", unet, y, 3.0)(x, t).eps, cfg)  # the network is itself again
    with pytest.raises(GuidelabError, match=r"guidance.tau2 \(0.5\) must be above guidance.tau1 \(0.6\)"):
        eps_function("cads", unet, y, 3.0, tau2=0.5, **kw)


# --- schedule: the CFG weight over t (Wang et al. 2024) ---------------------------------------------------------------


def test_scheduled_weights_rise_as_noise_falls_with_the_constant_weights_mean():
    grid = [i / 10000 for i in range(10001)]
    for schedule in ("linear", "cosine"):
        weights = [scheduled_weight(2.0, t, schedule) for t in grid]
        assert abs(sum(weights) / len(weights) - 2.0) < 1e-3, schedule  # the same total guidance as constant
        assert all(a >= b for a, b in zip(weights, weights[1:])), schedule  # falls with t: rises as noise falls
        assert weights[-1] == pytest.approx(0.0, abs=1e-12) and weights[0] == pytest.approx(4.0)
    assert scheduled_weight(2.0, 0.3, "constant") == 2.0
    assert scheduled_weight(2.0, 0.25, "linear") == pytest.approx(3.0)
    assert scheduled_weight(2.0, 0.5, "cosine") == pytest.approx(2.0)


def test_every_cfg_style_mode_takes_a_schedule_and_constant_is_the_unscheduled_mode():
    """For each mode whose scale is a CFG weight: schedule=constant is the mode as it was, bit for bit, and a schedule
    gives at each t exactly the mode at s_t = 1 + w_t."""
    nets = {False: _small_unet(), True: _small_unet(beta_embed=True)}  # gft: a network with GFT's beta input
    clf = ToyClassifier()
    clf.lin = torch.nn.Linear(64, 3)  # on 8x8 images
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    modes = [m for m, e in MODES.items() if e.traits["w"] and "guide" not in e.traits["needs"]]
    assert {"cfg", "apg", "icg", "pag", "cads", "fdg", "gft"} <= set(modes) and "cg" not in modes
    kw = dict(classifier=clf, diffusion=PROCESS)
    for mode in modes:
        unet = nets[mode == "gft"]
        for level in (900, 300):
            t = torch.full((3,), level)
            plain = eps_function(mode, unet, y, 3.0, **kw)(x, t).eps
            assert torch.equal(eps_function(mode, unet, y, 3.0, schedule="constant", **kw)(x, t).eps, plain), mode
            s_t = 1 + scheduled_weight(2.0, level / 1000, "linear")
            expected = eps_function(mode, unet, y, s_t, **kw)(x, t).eps
            assert torch.allclose(
                eps_function(mode, unet, y, 3.0, schedule="linear", **kw)(x, t).eps, expected, atol=1e-6
            ), (mode, level)


def test_a_schedule_needs_a_cfg_style_mode_and_a_known_name():
    unet, (_, _, y) = ToyUNet(), _inputs()
    with pytest.raises(GuidelabError, match="schedule=linear varies the CFG weight w = s - 1, but guidance=cg's scale"):
        eps_function("cg", unet, y, 3.0, classifier=ToyClassifier(), schedule="linear")
    with pytest.raises(GuidelabError, match="schedule must be one of constant, linear, cosine, got 'step'"):
        eps_function("cfg", unet, y, 3.0, diffusion=PROCESS, schedule="step")
    with pytest.raises(GuidelabError, match="needs the noise schedule"):
        eps_function("cfg", unet, y, 3.0, schedule="cosine")


def test_the_classifier_terms_are_timed_on_a_counted_classifier_and_nothing_else():
    """classifier_share's measurement: the noisy classifier's term (cg) and cg_x0's classifier-and-backward part add
    to Counted.seconds; at s = 0 there is no classifier pass and no time; a bare network is not timed at all."""
    from guidelab.guided import Counted

    unet, (x, t, y) = ToyUNet(), _inputs()
    for mode in ("cg", "cg_x0"):
        clf = Counted(ToyClassifier())
        eps_function(mode, unet, y, 0.0, classifier=clf, diffusion=PROCESS)(x, t)
        assert clf.seconds == 0 and clf.rows == 0, mode
        eps_function(mode, unet, y, 2.0, classifier=clf, diffusion=PROCESS)(x, t)
        assert clf.seconds > 0 and clf.rows == len(x), mode
    out = eps_function("cg", unet, y, 2.0, classifier=ToyClassifier(), diffusion=PROCESS)(x, t)  # times nothing
    assert out.score is not None
