"""Schedules, the forward process, x0 from eps and the posterior against independent closed forms."""

import math

import pytest
import torch

from guidelab.diffusion import Diffusion, cosine_betas, gather, linear_betas, make_betas
from guidelab.errors import GuidelabError


def test_linear_schedule_endpoints_and_spacing():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_cosine_schedule_matches_closed_form_alpha_bar():
    T, s = 1000, 0.008
    abar = Diffusion(cosine_betas(T)).abar
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # Nichol & Dhariwal 2021, Eq. 17
    for t in (0, 100, 500, 900):  # the 0.999 clip only bites at the very end
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(T).max().item() <= 0.999


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(GuidelabError, match="linear.*cosine"):
        make_betas("quadratic", 10)


def test_q_sample_statistics():
    d = Diffusion(linear_betas(1000))
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for t_val in (0, 250, 999):
        t = torch.full((len(x0),), t_val)
        xt = d.q_sample(x0, t, torch.randn_like(x0))
        abar = d.abar[t_val].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.01)
        assert xt.std().item() == pytest.approx(math.sqrt(1 - abar), abs=0.01)


def test_predict_x0_inverts_q_sample():
    d = Diffusion(cosine_betas(1000))
    x0, noise = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4)
    t = torch.randint(0, 990, (8,))
    xt = d.q_sample(x0, t, noise)
    assert torch.allclose(d.predict_x0(xt, t, noise), x0, atol=1e-4)
    assert torch.allclose(d.eps_from_x0(xt, t, x0), noise, atol=1e-4)


def test_posterior_matches_product_of_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1-abar_{t-1}) N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
    d = Diffusion(linear_betas(1000))
    x0, xt = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    for t_val in (1, 10, 500, 999):
        t = torch.full((5,), t_val)
        ab_prev, alpha, beta = d.abar[t_val - 1].item(), d.alphas[t_val].item(), d.betas[t_val].item()
        precision = 1 / (1 - ab_prev) + alpha / beta
        mean_ref = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(alpha) * xt / beta) / precision
        mean, var = d.posterior(x0, xt, t)
        assert torch.allclose(mean, mean_ref, atol=1e-5)
        assert var[0].item() == pytest.approx(1 / precision, rel=1e-5)


def test_eps_loss_is_zero_for_the_true_noise():
    """An oracle that knows x0 recovers the noise exactly, so L_simple is ~0; a zero predictor scores ~1."""
    d = Diffusion(linear_betas(1000))
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    oracle = lambda xt, t, y: d.eps_from_x0(xt, t, x0)
    assert d.eps_loss(oracle, x0, None).item() < 1e-6
    assert d.eps_loss(lambda xt, t, y: torch.zeros_like(xt), x0, None).item() == pytest.approx(1.0, abs=0.15)


def test_respacing_keeps_alpha_bar_on_the_kept_steps():
    d = Diffusion(linear_betas(1000))
    keep = torch.tensor([3, 10, 400, 999])
    r = d.respace(keep)
    assert r.num_steps == 4 and r.model_t.tolist() == keep.tolist()
    assert torch.allclose(r.abar, d.abar[keep], rtol=1e-10)
    assert r.abar_prev[0] == 1  # the grid's last step goes to abar = 1 (sigma = 0)
    assert d.respace(torch.arange(1000)) is d


def test_coefficients_aregathered_in_the_dtype_of_x():
    """A float64 run keeps float64 coefficients (float32 ones would cap it at ~1e-7 relative error); float32 and
    half-precision inputs get float32 coefficients, as before."""
    d = Diffusion(cosine_betas(1000))
    t = torch.tensor([3, 500, 990])
    x64 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x64)
    exact = (x64 - (1 - d.abar[t]).sqrt().view(-1, 1, 1, 1) * eps) / d.abar[t].sqrt().view(-1, 1, 1, 1)
    assert gather(d.abar, t, x64).dtype == torch.float64
    assert torch.allclose(d.predict_x0(x64, t, eps), exact, rtol=1e-12, atol=0)
    assert torch.allclose(d.eps_from_x0(x64, t, d.predict_x0(x64, t, eps)), eps, rtol=1e-9, atol=1e-12)
    for dtype in (torch.float32, torch.bfloat16):
        assert gather(d.abar, t, x64.to(dtype)).dtype == torch.float32
