"""The classifier-guidance methods of 2022-2025 and feedback guidance on constructed networks: each reduces to the mode
it extends where its knobs are off, its gradient matches a finite difference, and its defining property holds
(entropy-driven scale, calibrated log-probability, softplus smoothing, sine schedule, backward guidance,
self-recurrence, the feedback scale and its log-posterior update), plus the classifier-training options (entropy
constraint, PGD on x_t)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import _script_module, eps_function
from guidelab.diffusion import Diffusion, cosine_betas, gather, linear_betas, log_snr
from guidelab.errors import GuidelabError
from guidelab.guidance import (
    backward_delta,
    calibrated_log_p,
    classifier_score,
    entropy_factor,
    fbg_scale,
    log_p,
    log_posterior_step,
    sine_boost,
    softplus_copy,
    tweedie_bound,
    x0_classifier_score,
)
from guidelab.guided import Guided
from guidelab.models import ResNet
from guidelab.sampling import renoise, sample

PROCESS = Diffusion(linear_betas(1000))


class ToyUNet(torch.nn.Module):
    """eps depends smoothly on x, t and the label (null = 3)."""

    null_class = 3

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 1)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, y):
        h = self.lin(x.flatten(1)).view_as(x)
        return torch.tanh(h) * 0.5 + self.emb(y).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).float() * 1e-4


class ToyClassifier(torch.nn.Module):
    """A small MLP on x (plus a time term); `act` is its activation."""

    def __init__(self, act=F.silu, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.act = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3), act

    def forward(self, x, t):
        return self.b(self.act(self.a(x.flatten(1)))) * 3 + t.float().view(-1, 1) * 1e-4


class ReLUModuleClassifier(ToyClassifier):
    def __init__(self):
        super().__init__()
        self.relu = torch.nn.ReLU()

    def forward(self, x, t):
        return self.b(self.relu(self.a(x.flatten(1)))) * 3


def _inputs(b=6, seed=0):
    torch.manual_seed(seed)
    return torch.randn(b, 1, 2, 2), torch.randint(1, 1000, (b,)), torch.randint(0, 3, (b,))


# ---------------------------------------------------------------- entropy-driven scale (Zheng et al. 2022)
def test_entropy_factor_is_one_for_uniform_beliefs_and_grows_as_they_sharpen():
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [8.0, 0.0, 0.0]])
    k = entropy_factor(logits).flatten()
    assert torch.allclose(k[0], torch.tensor(1.0)) and k[0] < k[1] < k[2]
    p = logits[1].softmax(-1)
    assert torch.allclose(k[1], math.log(3) / -(p * p.log()).sum())
    assert torch.isfinite(entropy_factor(torch.tensor([[1e4, 0.0, 0.0]]))).all()  # the 1e-8 nats floor


@pytest.mark.parametrize("mode", ["cg", "cg_interval"])
def test_cg_entropy_scale_off_is_plain_cg_and_on_scales_each_sample(mode):
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    t = torch.full_like(t, 300)  # inside the interval's default (0.28, 5.42]
    off = eps_function(mode, unet, y, 2.0, classifier=clf, diffusion=PROCESS)(x, t)
    assert torch.equal(off.score, 2.0 * classifier_score(clf, x, t, y))
    on = eps_function(mode, unet, y, 2.0, classifier=clf, diffusion=PROCESS, entropy_scale=True)(x, t)
    k = entropy_factor(clf(x, t))
    assert torch.allclose(on.score, off.score * k) and (k > 1).all() and torch.equal(on.eps, off.eps)


def test_cg_x0_entropy_scale_reads_the_classifier_on_x0_hat():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    off = eps_function("cg_x0", unet, y, 2.0, classifier=clf, diffusion=PROCESS)(x, t)
    on = eps_function("cg_x0", unet, y, 2.0, classifier=clf, diffusion=PROCESS, entropy_scale=True)(x, t)
    x0_hat = PROCESS.predict_x0(x, t, unet(x, t, torch.full_like(y, 3)))
    assert torch.allclose(on.score, off.score * entropy_factor(clf(x0_hat, torch.zeros_like(t))), atol=1e-6)


# ---------------------------------------------------------------- off-the-shelf CG (Ma et al. 2023)
def test_calibrated_log_p_reduces_to_log_softmax_and_follows_its_formula():
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert torch.equal(calibrated_log_p(logits, y), log_p(logits, y))
    assert torch.allclose(calibrated_log_p(logits, y, 2.0, 2.0), log_p(2 * logits, y))
    expected = 1.0 * logits[range(5), y] - torch.logsumexp(0.5 * logits, -1)
    assert torch.allclose(calibrated_log_p(logits, y, 1.0, 0.5), expected)


def test_softplus_copy_smooths_the_guides_relus_and_no_other_network():
    """Every ReLU module of a copy becomes softplus(beta); the network itself, a second network of the same family and
    the process-wide functions keep ReLU (no patch outlives, or reaches beyond, the copy)."""
    torch.manual_seed(0)
    net, other = ResNet(1, 8, 3, channels=4, channel_mult=(1, 2), num_blocks=1), ResNet(1, 8, 3, channels=4)
    x = torch.randn(4, 1, 8, 8)
    before, other_before = net(x), other(x)
    smooth, replaced = softplus_copy(net, 3.0)
    assert replaced == sum(isinstance(m, torch.nn.ReLU) for m in net.modules()) == 5
    assert not any(isinstance(m, torch.nn.ReLU) for m in smooth.modules())
    assert torch.equal(net(x), before) and torch.equal(other(x), other_before)  # untouched
    assert not torch.allclose(smooth(x), before, atol=1e-3)
    v = torch.linspace(-2, 2, 9)
    assert torch.equal(torch.relu(v), v.clamp(min=0)) and torch.equal(F.relu(v), v.clamp(min=0))
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    assert torch.allclose(softplus_copy(plain, 3.0)[0][1](v), F.softplus(v, beta=3.0))


def test_sine_boost_is_one_at_gamma_0_and_t_0_and_follows_the_schedule_between():
    x, t = torch.zeros(3, 1, 2, 2), torch.tensor([0, 500, 999])
    assert torch.equal(sine_boost(PROCESS, t, 0.0, x), torch.ones(3, 1, 1, 1))
    k = sine_boost(PROCESS, t, 0.3, x).flatten().double()
    var = PROCESS.posterior_var
    assert k[0] == 1
    assert torch.allclose(k[1], 1 + 0.3 * math.sin(math.pi * 0.5) * var.max() / var[500], rtol=1e-6)
    assert 1 < k[2] < k[1]  # sin falls again towards t = T


def test_sine_boost_means_the_same_at_the_same_noise_level_on_every_schedule():
    """On the cosine schedule the boost is the linear schedule's at the same log-SNR: within its range (<= 1.9 at
    gamma = 0.3), never the 44-178x that the capped last beta (0.999) made of max(Sigma) over the model's own
    process."""
    cosine, t = Diffusion(cosine_betas(1000)), torch.arange(1000)
    k = sine_boost(cosine, t, 0.3, torch.zeros(1000, 1, 1, 1)).flatten().double()
    k_linear = sine_boost(PROCESS, t, 0.3, torch.zeros(1000, 1, 1, 1)).flatten().double()
    assert k.max() <= k_linear.max() + 1e-6 and k.min() >= 1
    lam_cos, lam_lin = log_snr(cosine.abar), log_snr(PROCESS.abar)
    for t_cos in (200, 500, 800):  # the linear timestep of the same noise level gets (nearly) the same boost
        t_lin = int((lam_lin - lam_cos[t_cos]).abs().argmin())
        assert abs(k[t_cos] - k_linear[t_lin]) < 0.01 * k_linear[t_lin], t_cos


def test_cg_ots_is_the_gradient_at_x0_hat_and_reduces_to_plain_log_p_with_its_knobs_off():
    """tau1 = tau2 = 1, gamma = 0: s grad_{x0} log p(y | x0_hat) at x0_hat = clip(predict_x0), the classifier at
    t = 0, by finite differences; one UNet pass, none of it differentiated."""
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    out = eps_function("cg_ots", unet, y, 2.0, classifier=clf, diffusion=PROCESS, tau1=1.0, tau2=1.0, gamma=0.0)(x, t)
    eps_u = unet(x, t, torch.full_like(y, 3))
    assert torch.equal(out.eps, eps_u)
    x0 = PROCESS.predict_x0(x, t, eps_u).clamp(-1, 1).double()
    clf64 = ToyClassifier().double()
    fd = torch.zeros_like(x0)
    for idx in range(4):
        e = torch.zeros_like(x0).view(len(x0), -1)
        e[:, idx] = 1e-6
        e = e.view_as(x0)
        zero = torch.zeros_like(t)
        fd.view(len(x0), -1)[:, idx] = (log_p(clf64(x0 + e, zero), y) - log_p(clf64(x0 - e, zero), y)) / 2e-6
    bounded = tweedie_bound(fd, PROCESS.abar[t].view(-1, 1, 1, 1))  # projected as a Bayes classifier's gradient
    assert torch.allclose(out.score.double(), 2.0 * bounded, atol=1e-4)
    assert all(p.grad is None for p in unet.parameters())


def test_cg_ots_calibration_and_schedule_enter_as_their_formulas():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    out = eps_function("cg_ots", unet, y, 2.0, classifier=clf, diffusion=PROCESS, tau1=1.0, tau2=0.5, gamma=0.3)(x, t)
    x0 = PROCESS.predict_x0(x, t, unet(x, t, torch.full_like(y, 3))).clamp(-1, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(calibrated_log_p(clf(x0, torch.zeros_like(t)), y, 1.0, 0.5).sum(), x0)
    grad = tweedie_bound(grad, gather(PROCESS.abar, t, x))
    assert torch.allclose(out.score, 2.0 * sine_boost(PROCESS, t, 0.3, x) * grad, atol=1e-6)


def test_cg_ots_softplus_smooths_a_relu_classifier_and_refuses_one_without_relus():
    unet, (x, t, y) = ToyUNet(), _inputs()
    relu_clf = ReLUModuleClassifier()
    sharp = eps_function("cg_ots", unet, y, 2.0, classifier=relu_clf, diffusion=PROCESS, gamma=0.0)(x, t)
    smooth = eps_function("cg_ots", unet, y, 2.0, classifier=relu_clf, diffusion=PROCESS, gamma=0.0, softplus_beta=3)
    assert not torch.allclose(smooth(x, t).score, sharp.score)
    with pytest.raises(GuidelabError, match="has none"):
        eps_function("cg_ots", unet, y, 2.0, classifier=ToyClassifier(), diffusion=PROCESS, softplus_beta=3)(x, t)


# ---------------------------------------------------------------- universal guidance (Bansal et al. 2023)
def test_backward_delta_is_zero_without_steps_and_lowers_the_loss_with_them():
    clf, (x, _, y) = ToyClassifier(), _inputs()
    zero = torch.zeros(len(y), dtype=torch.long)
    assert torch.equal(backward_delta(clf, x, y, 0, 0.1), torch.zeros_like(x))
    delta = backward_delta(clf, x, y, 10, 0.05)
    assert (log_p(clf(x + delta, zero), y) > log_p(clf(x, zero), y)).all()


def test_cg_universal_without_backward_steps_is_cg_x0_and_with_them_moves_x0_by_delta():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    kw = dict(classifier=clf, diffusion=PROCESS)
    forward = eps_function("cg_x0", unet, y, 2.0, **kw)(x, t)
    plain = eps_function("cg_universal", unet, y, 2.0, backward_steps=0, **kw)(x, t)
    assert torch.equal(plain.eps, forward.eps) and torch.equal(plain.score, forward.score) and plain.x0_shift is None
    both = eps_function("cg_universal", unet, y, 2.0, backward_steps=3, backward_lr=0.05, **kw)(x, t)
    abar = PROCESS.abar[t].view(-1, 1, 1, 1).float()
    guided_eps = forward.eps - (1 - abar).sqrt() * forward.score
    delta = backward_delta(clf, PROCESS.predict_x0(x, t, guided_eps), y, 3, 0.05)
    assert torch.equal(both.score, forward.score) and torch.allclose(both.x0_shift, delta, atol=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "heun"])
def test_every_sampler_moves_its_data_prediction_by_exactly_the_backward_delta(name):
    """Universal guidance's backward step is x0_hat + Delta* in every sampler. Handed to DDPM as a score, its mean shift
    Sigma score applied only a fraction (1 - abar') sqrt(abar) / ((1 - abar) sqrt(abar')) of the step c0 Delta* (none
    at the last step); as `x0_shift` the posterior mean is that of x0_hat + Delta*."""
    delta, x0_model = torch.full((2, 1, 2, 2), 0.3), torch.full((2, 1, 2, 2), -0.2)

    def eps_fn(x, t):  # a model whose data prediction is x0_model wherever it is asked, and a backward step Delta*
        return Guided(PROCESS.eps_from_x0(x, t, x0_model), x0_shift=delta)

    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = sample(name, eps_fn, PROCESS, noise, 3, "linspace", False, torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0_model + delta, atol=1e-5), name  # the last step lands on x0_hat + Delta*


def test_self_recurrence_renoises_to_the_step_level_and_keeps_a_point_mass_exact():
    d = PROCESS.respace(torch.linspace(0, 999, 10).round().long())
    x_prev = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 5)
    x_t = renoise(d, x_prev, t, torch.Generator().manual_seed(0))
    alpha = d.alphas[5].float()
    assert abs(x_t.mean() - alpha.sqrt() * 0.7) < 0.02 and abs(x_t.var() - (1 - alpha)) < 0.02
    c = torch.tensor([0.3]).view(1, 1, 1, 1)
    calls = []

    def oracle(x, t):  # the exact eps of a point mass at c
        calls.append(1)
        a = PROCESS.abar[t].view(-1, 1, 1, 1).float()
        return Guided((x - a.sqrt() * c) / (1 - a).sqrt())

    noise = torch.randn(8, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    for name in ("ddim", "ddpm"):
        calls.clear()
        x = sample(
            name, oracle, PROCESS, noise, 10, "linspace", generator=torch.Generator().manual_seed(1), recurrence=2
        )
        assert torch.allclose(x, c.expand_as(x), atol=1e-3) and len(calls) == 30, name


def test_recurrence_zero_is_the_plain_sampler_bit_for_bit():
    unet, (_, _, y) = ToyUNet(), _inputs(4)
    fn = eps_function("cfg", unet, y, 2.0)
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for name in ("ddim", "ddpm"):
        a = sample(name, fn, PROCESS, noise, 8, "linspace", generator=torch.Generator().manual_seed(1))
        b = sample(name, fn, PROCESS, noise, 8, "linspace", generator=torch.Generator().manual_seed(1), recurrence=0)
        c = sample(name, fn, PROCESS, noise, 8, "linspace", generator=torch.Generator().manual_seed(1), recurrence=1)
        assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------- feedback guidance (Koulischer et al. 2025)
def test_fbg_scale_starts_at_one_over_pi_and_the_clamp_caps_it_at_lambda_max():
    assert torch.allclose(fbg_scale(torch.zeros(1), 0.8), torch.tensor(1 / 0.8))
    lam_max, pi = 10.0, 0.95
    floor = torch.tensor([math.log((1 - pi) * lam_max / (lam_max - 1))])
    assert torch.allclose(fbg_scale(floor, pi), torch.tensor(lam_max))
    assert fbg_scale(torch.tensor([3.0]), pi) < 1.02


def test_log_posterior_step_is_the_offset_when_the_models_agree_and_rises_on_the_conditional_mean():
    torch.manual_seed(0)
    x, x_next, d_u, d_c = (torch.randn(3, 1, 2, 2, dtype=torch.float64) for _ in range(4))
    s, s_next = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    L = torch.zeros(3, dtype=torch.float64)
    assert torch.allclose(log_posterior_step(L, x, x_next, s, s_next, d_u, d_u, 5.0, -0.1), L - 0.1)
    mu_c = 0.25 * x + 0.75 * d_c  # the conditional kernel's mean: the step the conditional model would take
    assert (log_posterior_step(L, x, mu_c, s, s_next, d_u, d_c, 1.0, 0.0) > 0).all()


def test_fbg_with_a_zero_offset_is_cfg_at_one_over_pi():
    """pi = 1/3 makes log((1 - pi) lambda_ref / (lambda_ref - 1)) = 0: no offset, no temperature, the posterior stays
    at 1 and FBG is CFG at s = 1 / pi = 3 at every step."""
    unet, (x, t, y) = ToyUNet(), _inputs()
    fbg = eps_function("fbg", unet, y, 10.0, diffusion=PROCESS, pi=1 / 3)
    for step in (900, 700, 500):
        t = torch.full_like(t, step)
        assert torch.allclose(fbg(x, t).eps, eps_function("cfg", unet, y, 3.0)(x, t).eps, atol=1e-5)


def test_fbg_feeds_the_trajectory_back_and_a_repeated_timestep_is_redone_from_the_previous_one():
    unet, (x, t, y) = ToyUNet(), _inputs()
    ta, tb = torch.full_like(t, 800), torch.full_like(t, 600)
    x_b, x_b2 = x * 0.9 + 0.1, x * 0.8
    heun = eps_function("fbg", unet, y, 10.0, diffusion=PROCESS)
    heun(x, ta), heun(x_b, tb)
    redone = heun(x_b2, tb)
    fresh = eps_function("fbg", unet, y, 10.0, diffusion=PROCESS)
    fresh(x, ta)
    assert torch.equal(redone.eps, fresh(x_b2, tb).eps)
    eps_u, eps_c = unet(x_b2, tb, torch.full_like(y, 3)), unet(x_b2, tb, y)
    lam = ((redone.eps - eps_u) / (eps_c - eps_u)).flatten(1).mean(1)
    assert ((lam >= 1) & (lam <= 10 + 1e-3)).all() and not torch.allclose(lam, torch.full_like(lam, 1 / 0.95))


@pytest.mark.parametrize(
    "mode, kwargs, scale, match",
    [
        ("cg_ots", {"tau1": 0.0}, 2.0, "guidance.tau1 must be > 0"),
        ("cg_ots", {"gamma": -1.0}, 2.0, "guidance.gamma must be >= 0"),
        ("cg_universal", {"backward_lr": 0.0}, 2.0, "guidance.backward_lr must be > 0"),
        ("fbg", {}, 1.0, "scale must be > 1"),
        ("fbg", {"pi": 0.0}, 3.0, "guidance.pi must be in"),
        ("fbg", {"t_0": 1.0}, 3.0, "guidance.t_0 must be in"),
    ],
)
def test_bad_values_of_the_new_modes_are_refused_in_one_line(mode, kwargs, scale, match):
    from guidelab.guidance import resolve

    with pytest.raises(GuidelabError, match=match):
        resolve(mode, scale, **kwargs)


# ---------------------------------------------------------------- classifier training options
def test_entropy_constraint_is_log_c_for_uniform_logits_and_pulls_towards_them():
    train_classifier = _script_module("train_classifier.py")
    assert torch.allclose(train_classifier.entropy_constraint(torch.zeros(4, 10)), torch.tensor(math.log(10)))
    logits = torch.tensor([[4.0, 0.0, 0.0]], requires_grad=True)
    train_classifier.entropy_constraint(logits).backward()
    assert logits.grad[0, 0] > 0 and (logits.grad[0, 1:] < 0).all()  # descent lowers the top logit


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_on_x_t_stays_in_its_ball_without_the_data_range_and_raises_the_loss(norm):
    train_classifier = _script_module("train_classifier.py")
    net = lambda x, t: ToyClassifier(seed=1)(x, t)
    torch.manual_seed(0)
    x, y, t = 3 * torch.randn(16, 1, 2, 2), torch.randint(0, 3, (16,)), torch.full((16,), 900)
    x_adv = train_classifier.pgd(net, x, y, t, 0.5, 5, norm, clamp=False)
    dist = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert (dist <= 0.5 + 1e-5).all() and x_adv.abs().max() > 1  # x_t keeps its range
    assert F.cross_entropy(net(x_adv, t), y) > F.cross_entropy(net(x, t), y)
    clean = train_classifier.pgd(net, x.clamp(-1, 1), y, t, 0.5, 5, norm)
    assert clean.abs().max() <= 1


@pytest.mark.parametrize(
    "override, match",
    [
        ("classifier.pgd_norm=l1", "classifier.pgd_norm must be one of linf, l2"),
        ("classifier.entropy_weight=-1", "classifier.entropy_weight must be in"),
    ],
)
def test_bad_classifier_training_options_are_refused_in_one_line(override, match):
    from conftest import check_command_line

    assert match in check_command_line("train_classifier.py", override)


def test_x0_classifier_score_returns_the_logits_it_read():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    logits = []
    eps, _ = x0_classifier_score(unet, clf, PROCESS, x, t, y, y, logits_out=logits)
    assert torch.allclose(logits[0], clf(PROCESS.predict_x0(x, t, eps), torch.zeros_like(t)), atol=1e-6)


# ---------------------------------------------------------------- compute per sample, measured
def test_measured_flops_count_forward_and_backward_passes_and_cfg_doubles_the_unet():
    from guidelab.guided import measured_flops

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert measured_flops(lin, x) == 2 * 2 * 4 * 3
    x.requires_grad_(True)
    assert measured_flops(lambda: torch.autograd.grad(lin(x).sum(), x)) == 2 * (2 * 2 * 4 * 3)  # + the input gradient
    unet, clf, (x, _, y) = ToyUNet(), ToyClassifier(), _inputs(4)
    noise = torch.randn(4, 1, 2, 2)

    def run(mode, **kw):
        fn = eps_function(mode, unet, y, 3.0, classifier=clf, diffusion=PROCESS, **kw)
        return measured_flops(sample, "ddim", fn, PROCESS, noise, 5, "linspace")

    none, cfg, cg = run("none"), run("cfg"), run("cg")
    assert none > 0 and cfg == 2 * none and cg > none


# ---------------------------------------------------------------- one pass of a guidance-free network
def test_gft_mode_is_one_pass_at_beta_one_over_s_and_refuses_a_network_without_beta():
    from guidelab.models import UNet

    torch.manual_seed(0)
    unet = UNet(1, 8, 3, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), beta_embed=True).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 500), torch.tensor([0, 1, 2])
    assert torch.equal(eps_function("gft", unet, y, 4.0)(x, t).eps, unet(x, t, y, beta=0.25))
    assert torch.equal(eps_function("gft", unet, y, 1.0)(x, t).eps, unet(x, t, y))  # beta = 1: the conditional model
    with pytest.raises(GuidelabError, match="train.guidance_free=gft model.beta_embed=true"):
        eps_function("gft", ToyUNet(), y, 2.0)
    from guidelab.guidance import resolve

    with pytest.raises(GuidelabError, match="scale must be >= 1"):
        resolve("gft", 0.5)
