"""Samplers against exact eps-functions: they land on the data, DDIM(eta=0) is deterministic, and the classifier
term moves samples as the tilted distribution says."""
import pytest
import torch

from guidelab.diffusion import Diffusion, cosine_betas, linear_betas
from guidelab.errors import GuidelabError
from guidelab.guidance import Guided
from guidelab.sampling import ddim, ddpm, sample


def point_mass_oracle(d: Diffusion, c: torch.Tensor):
    """The exact eps for a data distribution that is a single point c (t arrives as original timesteps)."""
    full = Diffusion(d.betas)
    return lambda x, t: Guided(full.eps_from_x0(x, t, c.expand_as(x)))


@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddpm", 40), ("ddim", 20), ("ddim", 1000)])
def test_samplers_recover_a_point_mass(name, steps):
    d = Diffusion(linear_betas(1000))
    c = torch.tensor([0.3, -0.6]).view(1, 2, 1, 1)
    noise = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample(name, point_mass_oracle(d, c), d, noise, steps, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x, c.expand_as(x), atol=1e-3)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    d = Diffusion(cosine_betas(1000))
    eps_fn = lambda x, t: Guided(0.5 * x)  # any smooth eps-function
    noise = torch.randn(4, 1, 3, 3)
    a = ddim(eps_fn, d, noise, steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim(eps_fn, d, noise, steps=10, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddim(eps_fn, d, noise, steps=10, eta=1.0, generator=torch.Generator().manual_seed(1))
    e = ddim(eps_fn, d, noise, steps=10, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, e)


@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddim", 100)])
def test_classifier_term_tilts_a_gaussian(name, steps):
    """Data N(0, 1) has x_t ~ N(0, 1) at every t (variance preserving) and E[eps|x_t] = sqrt(1-abar_t) x_t. With
    p(y|x_0) ∝ exp(a x_0) the exact noisy classifier is p(y|x_t) ∝ exp(a sqrt(abar_t) x_t), whose tilt turns every
    marginal into the diffused N(a, 1); both CG forms (mean shift, eps correction) must land on N(a, 1)."""
    d = Diffusion(linear_betas(1000))
    full = Diffusion(d.betas)
    a = 0.8

    def eps_fn(x, t):
        abar = full.abar[t].float().view(-1, 1, 1, 1)
        return Guided((1 - abar).sqrt() * x, a * abar.sqrt().expand_as(x))

    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample(name, eps_fn, d, noise, steps, clip_x0=False, generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(a, abs=0.08)
    assert x.std().item() == pytest.approx(1.0, abs=0.08)


def test_unknown_sampler():
    d = Diffusion(linear_betas(10))
    with pytest.raises(GuidelabError, match="ddpm, ddim"):
        sample("euler", lambda x, t: Guided(x), d, torch.zeros(1, 1, 1, 1), None)
