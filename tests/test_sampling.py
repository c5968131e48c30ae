"""Samplers against exact eps-functions: they land on the data, their error on the exact probability-flow ODE falls
with the step count, DDIM(eta=0) is deterministic, the classifier term moves samples as the tilted distribution says;
and the timestep grids every sampler shares."""

import pytest
import torch

from conftest import eps_function
from guidelab.diffusion import Diffusion, cosine_betas, linear_betas
from guidelab.errors import GuidelabError
from guidelab.guidance import MODES
from guidelab.guided import Guided
from guidelab.models import build_classifier, build_unet
from guidelab.sampling import SAMPLERS, SIGMA_MAX, SPACINGS, sample, timesteps

SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def spacing(name: str) -> str:
    """The sampler's default grid, as its registration declares it."""
    return SAMPLERS[name].shared["spacing"]


def point_mass_oracle(d: Diffusion, c: torch.Tensor):
    """The exact eps for a data distribution that is a single point c (t arrives as original timesteps)."""
    return lambda x, t: Guided(d.eps_from_x0(x, t, c.expand_as(x)))


def gaussian_oracle(d: Diffusion, mu: float, s: float):
    """Exact eps for data N(mu, s^2): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar), E[eps | x_t] =
    sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""

    def eps_fn(x, t):
        a = d.abar[t].view(-1, 1, 1, 1)
        return Guided(((1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)).float())

    return eps_fn


def gaussian_setup(schedule: str, mu: float = 0.5, s: float = 0.2, n: int = 256):
    """Data N(mu, s^2), its exact eps, noise x_T, and the probability-flow ODE's exact end point for each x_T:
    mu + s z with z = (x_T - sqrt(abar_T) mu) / sqrt(abar_T s^2 + 1 - abar_T)."""
    d = Diffusion(SCHEDULES[schedule](1000))
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    a_T = d.abar[-1]
    exact = mu + s * (noise - a_T.sqrt() * mu) / (a_T * s**2 + 1 - a_T).sqrt()
    return d, gaussian_oracle(d, mu, s), noise, exact


@pytest.mark.parametrize("steps", [None, 10, 40])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_recover_a_point_mass(name, steps):
    d = Diffusion(linear_betas(1000))
    c = torch.tensor([0.3, -0.6]).view(1, 2, 1, 1)
    noise = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample(
        name, point_mass_oracle(d, c), d, noise, steps, spacing(name), generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(x, c.expand_as(x), atol=1e-3)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    d = Diffusion(cosine_betas(1000))
    eps_fn = lambda x, t: Guided(0.5 * x)  # any smooth eps-function
    noise = torch.randn(4, 1, 3, 3)
    run = lambda eta, seed: sample(
        "ddim", eps_fn, d, noise, 10, "linspace", generator=torch.Generator().manual_seed(seed), eta=eta
    )
    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
    with pytest.raises(GuidelabError, match=r"sampler.eta must be in \[0, 1\], got 1.5"):
        run(1.5, 1)


@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddim", 100), ("dpmpp_2m", 50), ("heun", 50)])
def test_classifier_term_tilts_a_gaussian(name, steps):
    """Data N(0, 1) has x_t ~ N(0, 1) at every t (variance preserving) and E[eps|x_t] = sqrt(1-abar_t) x_t. With
    p(y|x_0) ∝ exp(a x_0) the exact noisy classifier is p(y|x_t) ∝ exp(a sqrt(abar_t) x_t), whose tilt turns every
    marginal into the diffused N(a, 1); both CG forms (mean shift, eps correction) must land on N(a, 1)."""
    d = Diffusion(linear_betas(1000))
    a = 0.8

    def eps_fn(x, t):
        abar = d.abar[t].float().view(-1, 1, 1, 1)
        return Guided((1 - abar).sqrt() * x, a * abar.sqrt().expand_as(x))

    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample(name, eps_fn, d, noise, steps, spacing(name), clip_x0=False, generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(a, abs=0.08)
    assert x.std().item() == pytest.approx(1.0, abs=0.08)


def test_unknown_sampler():
    d = Diffusion(linear_betas(10))
    with pytest.raises(GuidelabError, match=f"unknown sampler 'euler'; valid: {', '.join(sorted(SAMPLERS))}"):
        sample("euler", lambda x, t: Guided(x), d, torch.zeros(1, 1, 1, 1), None, "linspace")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("spacing_name", SPACINGS)
def test_every_grid_has_exactly_the_steps_asked_for(schedule, spacing_name):
    """`steps` distinct increasing timesteps in [0, T - 1]: the network evaluations the user pays for (per pass)."""
    d = Diffusion(SCHEDULES[schedule](1000))
    for steps in (1, 2, 7, 10, 25, 50, 200, 999, 1000):
        t = timesteps(d, steps, spacing_name)
        assert len(t) == steps and (t[1:] > t[:-1]).all() and 0 <= t[0] and t[-1] <= 999, (steps, t)
    assert torch.equal(timesteps(d, None, spacing_name), torch.arange(1000))


def test_grids_are_the_ones_diffusers_names():
    d = Diffusion(linear_betas(1000))
    assert timesteps(d, 10, "linspace").tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert timesteps(d, 10, "leading").tolist() == list(range(0, 1000, 100))
    assert timesteps(d, 10, "trailing").tolist() == list(range(99, 1000, 100))
    cosine = Diffusion(cosine_betas(1000))
    for grid in (timesteps(d, 25, "logsnr"), timesteps(cosine, 25, "logsnr")):
        assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 25  # the cosine grid no longer bunches at t >= 990
    for process in (d, cosine):  # below sigma_max = 80, log-SNR is evenly spaced up to the rounding to timesteps
        grid = timesteps(process, 25, "logsnr")[:-1]
        lam = 0.5 * (process.abar[grid].log() - (1 - process.abar[grid]).log())
        gaps = lam[:-1] - lam[1:]
        assert gaps.max() < 1.6 * gaps.median(), gaps
    for bad, match in [
        ((0, "linspace"), "sampler.steps must be in"),
        ((1001, "linspace"), "sampler.steps must be in"),
        ((10, "time"), "sampler.spacing must be one of linspace, leading, trailing, logsnr"),
    ]:
        with pytest.raises(GuidelabError, match=match):
            timesteps(d, *bad)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "ddpm"])
def test_ode_error_falls_as_the_step_count_rises(name, schedule):
    """On the exact probability-flow ODE of Gaussian data each deterministic sampler, on its default grid, gets more
    accurate with every step count, for both schedules."""
    d, oracle, noise, exact = gaussian_setup(schedule)
    errors = [
        (sample(name, oracle, d, noise, steps, spacing(name), clip_x0=False) - exact).abs().max().item()
        for steps in (5, 10, 20, 50)
    ]
    assert all(b < 0.8 * a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddpm_distribution_error_falls_as_the_step_count_rises(schedule):
    """Ancestral sampling is stochastic: its error is in the distribution. With the exact eps of N(0.5, 0.2^2) data the
    samples' mean and std approach 0.5 and 0.2 as the steps rise (20,000 samples: the sampling error of the std is
    about 0.001, several times below the differences between step counts)."""
    d, oracle, _, _ = gaussian_setup(schedule)
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 20, 50, None):
        x = sample(
            "ddpm", oracle, d, noise, steps, spacing("ddpm"), clip_x0=False, generator=torch.Generator().manual_seed(1)
        )
        errors.append(abs(x.mean().item() - 0.5) + abs(x.std().item() - 0.2))
    assert all(b < 0.8 * a for a, b in zip(errors, errors[1:])), errors


def test_dpmpp_2m_solves_the_ode_more_accurately_than_ddim_at_few_steps():
    """DPM-Solver++(2M) is second order, DDIM first order: on the same 10-step logSNR grid its error is far smaller."""
    d, oracle, noise, exact = gaussian_setup("linear")
    errors = {
        name: (sample(name, oracle, d, noise, 10, "logsnr", clip_x0=False) - exact).abs().max().item()
        for name in ("ddim", "dpmpp_2m")
    }
    assert errors["dpmpp_2m"] < errors["ddim"] / 5, errors


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_given_x0_consistent_with_eps_changes_nothing(name):
    """Guided.x0 (CFG++) replaces the data prediction; eps stays the re-noising direction. An x0 equal to the one eps
    implies must give the same samples in every sampler."""
    d = Diffusion(linear_betas(1000))
    eps_fn = lambda x, t: Guided(0.3 * x)
    with_x0 = lambda x, t: Guided(0.3 * x, x0=d.predict_x0(x, t, 0.3 * x))
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = sample(name, eps_fn, d, noise, 10, spacing(name), clip_x0=False, generator=torch.Generator().manual_seed(1))
    b = sample(name, with_x0, d, noise, 10, spacing(name), clip_x0=False, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-4), name


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_a_guided_x0_is_renoised_along_eps(name):
    """The DDIM step with a given x0 is sqrt(abar') x0 + sqrt(1 - abar') eps, and the last step lands on x0."""
    d = Diffusion(linear_betas(1000))
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    target = torch.full_like(noise, 0.25)
    seen = []

    def given_x0(x, t):
        seen.append(x)
        return Guided(0.3 * noise, x0=target)

    x = sample(name, given_x0, d, noise, 2, "linspace", clip_x0=False)  # two linspace steps: T-1 -> 0 -> data
    assert torch.allclose(seen[1], d.abar[0].sqrt() * target + (1 - d.abar[0]).sqrt() * 0.3 * noise)
    assert torch.allclose(x, target)


TINY_UNET = {
    "name": "tiny",
    "channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "p_uncond": 0.1,
}
TINY_CLASSIFIER = {"name": "tiny", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}
MODE_SCALES = {"cfgpp": 0.6}  # every other mode: scale 3


def _random_unet(beta_embed: bool = False):
    """A tiny UNet whose zero-initialised output layers are randomised, so that labels (and GFT's beta) change its
    prediction."""
    unet = build_unet({**TINY_UNET, "beta_embed": beta_embed}, 1, 8, 3).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    return unet


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_sampler_runs_every_guidance_mode(sampler, mode):
    """The full sampler x guidance matrix on tiny random networks with every mode's default keys: finite samples of
    the right shape, and (for every mode that guides) different from the unguided conditional model's samples."""
    torch.manual_seed(0)
    unet, guide = _random_unet(beta_embed=mode == "gft"), _random_unet()
    classifier = build_classifier(TINY_CLASSIFIER, 1, 8, 3).eval()
    d = Diffusion(linear_betas(100))
    y = torch.tensor([0, 1, 2, 0])
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps_fn = eps_function(mode, unet, y, MODE_SCALES.get(mode, 3.0), classifier=classifier, diffusion=d, guide=guide)
    x = sample(sampler, eps_fn, d, noise, 4, spacing(sampler), generator=torch.Generator().manual_seed(1))
    assert x.shape == noise.shape and torch.isfinite(x).all()
    base = sample(
        sampler,
        eps_function("none", unet, y, base="cond"),
        d,
        noise,
        4,
        spacing(sampler),
        generator=torch.Generator().manual_seed(1),
    )
    if mode != "none":
        assert not torch.allclose(x, base, atol=1e-4)


def test_heun_is_karras_algorithm_1():
    """Heun on this VP model equals Karras et al. 2022, Alg. 1 written in their variables (sigma(t) = t, s(t) = 1: x =
    x_t / sqrt(abar), D the denoiser) on the same sigma grid, for Gaussian data whose denoiser is exact: D(x; sigma) =
    mu + s^2 / (s^2 + sigma^2) (x - mu); a step from above their sigma_max = 80 (the logsnr grid's first, from t = T - 1
    at sigma = 158, entering their schedule) is its Euler step alone. (Linear schedule: the cosine one's first sigma,
    2e4, amplifies the float32 rounding of the oracle's eps to 1e-3 in x_0, in every sampler alike.)"""
    mu, s = 0.5, 0.2
    d, oracle, noise, _ = gaussian_setup("linear", mu, s)
    grid = timesteps(d, 8, "logsnr")
    sigmas = [float(v) for v in ((1 - d.abar[grid]) / d.abar[grid]).sqrt().flip(0)] + [0.0]
    denoise = lambda x, sigma: mu + s**2 / (s**2 + sigma**2) * (x - mu)
    x = noise.double() / d.abar[grid[-1]].sqrt()
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        slope = (x - denoise(x, sigma)) / sigma
        x_next = x + (sigma_next - sigma) * slope
        if sigma_next != 0 and not (sigma == sigmas[0] and sigma > SIGMA_MAX):  # the entry step: Euler alone
            x_next = x + (sigma_next - sigma) * (slope + (x_next - denoise(x_next, sigma_next)) / sigma_next) / 2
        x = x_next
    ours = sample("heun", oracle, d, noise, 8, "logsnr", clip_x0=False)
    assert torch.allclose(ours.double(), x, atol=1e-5, rtol=1e-5), (ours.double() - x).abs().max()


def test_heun_is_ddim_where_the_slope_does_not_change_and_second_order_where_it_does():
    """For a single data point the ODE's slope (eps) is constant along a path, so Heun's correction vanishes and it
    equals DDIM (Euler); on Gaussian data halving the step size cuts its error about 4x (second order) where DDIM's
    only halves."""
    d = Diffusion(linear_betas(1000))
    c = torch.tensor([0.3, -0.6]).view(1, 2, 1, 1)
    noise = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    args = (point_mass_oracle(d, c), d, noise, 10, "logsnr")
    assert torch.allclose(sample("heun", *args, clip_x0=False), sample("ddim", *args, clip_x0=False), atol=1e-5)
    d, oracle, noise, exact = gaussian_setup("linear")
    error = {
        (name, n): (sample(name, oracle, d, noise, n, "logsnr", clip_x0=False) - exact).abs().max().item()
        for name in ("heun", "ddim")
        for n in (10, 20)
    }
    assert error["heun", 10] / error["heun", 20] > 3 and error["ddim", 10] / error["ddim", 20] < 2.5, error


def test_heun_costs_two_evaluations_per_step_but_the_last_and_one_beyond_sigma_max():
    d = Diffusion(linear_betas(1000))
    calls = []
    eps_fn = lambda x, t: calls.append(int(t[0])) or Guided(0.3 * x)
    sample("heun", eps_fn, d, torch.zeros(2, 1, 1, 1), 7, "leading")  # every step starts below sigma = 80
    grid = timesteps(d, 7, "leading").flip(0).tolist()
    assert len(calls) == 2 * 7 - 1 and calls == [grid[0]] + [g for g in grid[1:] for _ in (0, 1)]
    calls.clear()
    sample("heun", eps_fn, d, torch.zeros(2, 1, 1, 1), 7, "logsnr")  # its first step, from t = 999, starts at 158
    grid = timesteps(d, 7, "logsnr").flip(0).tolist()
    assert len(calls) == 2 * 7 - 2 and calls == grid[:2] + [g for g in grid[2:] for _ in (0, 1)]


def test_the_classifier_correction_comes_after_the_clip_and_is_not_clipped_again():
    """guided-diffusion's order (condition_score on the clipped prediction): eps of the clipped x_0, minus
    sqrt(1 - abar_t) score, and x_0 of that eps left unclipped: one DDIM step from T - 1 to the data."""
    d = Diffusion(linear_betas(1000))
    x = torch.full((2, 1, 2, 2), 0.5)
    eps, score = torch.full_like(x, -3.0), torch.full_like(x, 0.02)  # x_0 of this eps is far above 1
    abar = d.abar[999]
    clipped = torch.ones_like(x)
    eps_clipped = (x - abar.sqrt() * clipped) / (1 - abar).sqrt()
    guided = eps_clipped - (1 - abar).sqrt() * score
    expected = (x - (1 - abar).sqrt() * guided) / abar.sqrt()  # beyond 1: the push survives
    out = sample("ddim", lambda x_t, t_: Guided(eps, score), d, x, 1, "trailing")  # the one timestep T - 1
    assert torch.allclose(out, expected, atol=1e-4) and out.min() > 1.0


class GaussianUNet:
    """A network whose every class is data N(0, 0.5^2): the exact eps, the same for every label (CFG is then exact)."""

    null_class = 10

    def __init__(self, d: Diffusion):
        self.oracle = gaussian_oracle(d, 0.0, 0.5)

    def __call__(self, x, t, y):
        return self.oracle(x, t).eps


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cfg_zero_star_keeps_the_sample_in_range_without_clipping_on_the_cosine_schedule(name):
    """Zero-init in x0 space: without clip_x0, on the cosine schedule (abar_T ~ 1e-9), the samples of data N(0, 0.5^2)
    end with std ~0.5. Zeroing eps instead (x0 = x_t / sqrt(abar_T)) multiplies them by hundreds at the first step."""
    d = Diffusion(cosine_betas(1000))
    unet, y = GaussianUNet(d), torch.zeros(512, dtype=torch.long)
    noise = torch.randn(512, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    run = lambda eps_fn: sample(
        name, eps_fn, d, noise, 20, spacing(name), clip_x0=False, generator=torch.Generator().manual_seed(1)
    )
    x = run(eps_function("cfg_zero_star", unet, y, 3.0, diffusion=d, zero_init_steps=1))
    assert 0.4 < x.std() < 0.6, x.std()
    first = int(d.respace(timesteps(d, 20, spacing(name))).model_t[-1])  # the zero-init level, by the old rule
    eps_zeroed = lambda x, t: Guided(torch.zeros_like(x)) if int(t[0]) == first else Guided(unet(x, t, y))
    assert run(eps_zeroed).std() > 10
