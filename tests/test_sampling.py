"""Samplers against exact eps-functions: they land on the data, DDIM(eta=0) is deterministic, and the classifier
term moves samples as the tilted distribution says."""
import pytest
import torch

from guidelab.diffusion import Diffusion, cosine_betas, linear_betas
from guidelab.errors import GuidelabError
from guidelab.guidance import MODES, Guided, make_eps_fn
from guidelab.models import build_classifier, build_unet
from guidelab.sampling import SAMPLERS, ddim, ddpm, dpmpp_2m, sample


def point_mass_oracle(d: Diffusion, c: torch.Tensor):
    """The exact eps for a data distribution that is a single point c (t arrives as original timesteps)."""
    full = Diffusion(d.betas)
    return lambda x, t: Guided(full.eps_from_x0(x, t, c.expand_as(x)))


@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddpm", 40), ("ddim", 20), ("ddim", 1000), ("dpmpp_2m", 10),
                                        ("dpmpp_2m", 1000)])
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


@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddim", 100), ("dpmpp_2m", 50)])
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
    with pytest.raises(GuidelabError, match="ddpm, ddim, dpmpp_2m"):
        sample("euler", lambda x, t: Guided(x), d, torch.zeros(1, 1, 1, 1), None)


def gaussian_oracle(d: Diffusion, mu: float, s: float):
    """Exact eps for data N(mu, s^2): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar), E[eps | x_t] =
    sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
    full = Diffusion(d.betas)

    def eps_fn(x, t):
        a = full.abar[t].view(-1, 1, 1, 1)
        return Guided(((1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)).float())
    return eps_fn


def test_dpmpp_2m_solves_the_ode_more_accurately_than_ddim_at_few_steps():
    """The probability-flow ODE maps x_T to mu + s z, z = (x_T - sqrt(abar_T) mu) / sqrt(abar_T s^2 + 1 - abar_T), for
    Gaussian data. DPM-Solver++(2M) is second order, DDIM first order: on the same (logSNR-spaced) 10 steps its error
    must be far smaller, and shrink with more steps."""
    d = Diffusion(linear_betas(1000))
    mu, s = 0.5, 0.2
    noise = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    a_T = d.abar[-1]
    exact = mu + s * (noise - a_T.sqrt() * mu) / (a_T * s**2 + 1 - a_T).sqrt()
    errors = {}
    for name in ("ddim", "dpmpp_2m"):
        x = sample(name, gaussian_oracle(d, mu, s), d, noise, 10, clip_x0=False, spacing="logsnr")
        errors[name] = (x - exact).abs().max().item()
    assert errors["dpmpp_2m"] < errors["ddim"] / 5, errors
    fine = dpmpp_2m(gaussian_oracle(d, mu, s), d, noise, steps=50, clip_x0=False)
    assert (fine - exact).abs().max().item() < errors["dpmpp_2m"]


def test_a_given_x0_consistent_with_eps_changes_nothing_and_a_guided_x0_is_renoised_along_eps():
    """Guided.x0 (CFG++) replaces the data prediction; eps stays the re-noising direction. An x0 equal to the one eps
    implies must give the same samples in every sampler; the DDIM step must be sqrt(abar') x0 + sqrt(1 - abar') eps."""
    d = Diffusion(linear_betas(1000))
    full = Diffusion(d.betas)
    eps_fn = lambda x, t: Guided(0.3 * x)
    with_x0 = lambda x, t: Guided(0.3 * x, x0=full.predict_x0(x, t, 0.3 * x))
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for name in SAMPLERS:
        a = sample(name, eps_fn, d, noise, 10, clip_x0=False, generator=torch.Generator().manual_seed(1))
        b = sample(name, with_x0, d, noise, 10, clip_x0=False, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(a, b, atol=1e-4), name
    target = torch.full_like(noise, 0.25)
    abar_mid = d.respace(2).abar[0]  # two steps: T-1 -> 0 -> data
    for name in ("ddim", "dpmpp_2m"):
        seen = []

        def given_x0(x, t):
            seen.append(x)
            return Guided(0.3 * noise, x0=target)
        x = sample(name, given_x0, d, noise, 2, clip_x0=False)
        assert torch.allclose(seen[1], abar_mid.sqrt() * target + (1 - abar_mid).sqrt() * 0.3 * noise), name
        assert torch.allclose(x, target), name  # the last step lands on the given x0


TINY_UNET = {"name": "tiny", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
             "p_uncond": 0.1}
TINY_CLASSIFIER = {"name": "tiny", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}
MODE_ARGS = {"cfg_cg": {"classifier_scale": 2.0}, "cfg_rescale": {"phi": 0.7}, "apg": {"norm_threshold": 4.0,
             "momentum": -0.5}, "cfg_interval": {"sigma_lo": 0.28, "sigma_hi": 5.42}}


def _random_unet():
    """A tiny UNet whose zero-initialised output layers are randomised, so that labels change its prediction."""
    unet = build_unet(TINY_UNET, 1, 8, 3).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    return unet


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", MODES)
def test_every_sampler_runs_every_guidance_mode(sampler, mode):
    """The full sampler x guidance matrix on tiny random networks: finite samples of the right shape, and (for every
    mode that guides) different from the unguided conditional model's samples from the same noise."""
    torch.manual_seed(0)
    unet, guide = _random_unet(), _random_unet()
    classifier = build_classifier(TINY_CLASSIFIER, 1, 8, 3).eval()
    d = Diffusion(linear_betas(100))
    y = torch.tensor([0, 1, 2, 0])
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    scale = 0.6 if mode == "cfgpp" else 3.0
    eps_fn = make_eps_fn(mode, unet, y, scale, classifier=classifier, diffusion=d, guide=guide, **MODE_ARGS.get(mode, {}))
    x = sample(sampler, eps_fn, d, noise, 4, generator=torch.Generator().manual_seed(1))
    assert x.shape == noise.shape and torch.isfinite(x).all()
    base = sample(sampler, make_eps_fn("none", unet, y, base="cond"), d, noise, 4,
                  generator=torch.Generator().manual_seed(1))
    if mode != "none":
        assert not torch.allclose(x, base, atol=1e-4)
