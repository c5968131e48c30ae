"""Gaussian diffusion: noise schedules, the forward process q(x_t | x_0), the eps loss and the posterior.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", DDPM): beta_t, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s. Index t runs over 0..T-1 (the paper's 1..T). A respaced process (Nichol & Dhariwal
2021, "Improved DDPM", Sec. 4) keeps a subsequence of the original timesteps; `model_t` maps its indices back to the
original timesteps the networks were trained on.

Besides L_simple, the two guidance-free losses (`train.guidance_free`), which train a class-conditional network whose
single pass samples like CFG: model guidance (`mg_loss`) and guidance-free training (`gft_loss`); `trained_guidance`
and `gft_beta` tell sampling what such a network's one pass means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from guidelab.errors import GuidelabError
from guidelab.pretrained import model_reference, read_schedule
from guidelab.registry import OneOf, Range

GUIDANCE_FREE = ("none", "mg", "gft")  # train.guidance_free: L_simple, model guidance, guidance-free training


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear schedule of Ho et al. 2020, Sec. 4 (beta_1 = 1e-4 .. beta_T = 0.02 at T = 1000), scaled with T as in
    Nichol & Dhariwal 2021 so that other T keep the same total noise."""
    scale = 1000 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s))
    pi/2), beta_t = 1 - abar_t / abar_{t-1}, clipped at 0.999 (their Sec. 3.2)."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def make_betas(schedule: str, num_steps: int) -> torch.Tensor:
    if schedule not in ("linear", "cosine"):
        raise GuidelabError(f"unknown noise schedule {schedule!r}; use diffusion=linear or diffusion=cosine")
    return (linear_betas if schedule == "linear" else cosine_betas)(num_steps)


def scheduler_betas(schedule: dict) -> torch.Tensor:
    """The betas of a diffusers scheduler config's schedule (float64), by DDPMScheduler's definitions: linear
    `linspace(beta_start, beta_end, T)` (in float32 as diffusers computes it, then widened; unlike guidelab's linear
    it is not rescaled with T), scaled_linear `linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (latent diffusion's),
    squaredcos_cap_v2 the cosine schedule of Nichol & Dhariwal 2021, Eq. 17, beta capped at 0.999."""
    T, kind = schedule["num_steps"], schedule["beta_schedule"]
    if kind == "squaredcos_cap_v2":
        return cosine_betas(T)
    if kind == "linear":
        return torch.linspace(schedule["beta_start"], schedule["beta_end"], T, dtype=torch.float32).double()
    start, end = math.sqrt(schedule["beta_start"]), math.sqrt(schedule["beta_end"])
    return (torch.linspace(start, end, T, dtype=torch.float32) ** 2).double()


def schedule_signature(cfg) -> dict:
    """A `diffusion` config's schedule in diffusers' terms {beta_schedule, num_steps, beta_start, beta_end}, so that
    networks of the same schedule match however it was named: guidelab's linear at T steps is diffusers' linear from
    1e-4 * 1000 / T to 0.02 * 1000 / T, its cosine is squaredcos_cap_v2; `schedule: pretrained` reads the model's."""
    if cfg["schedule"] == "pretrained":
        return {k: v for k, v in read_schedule(model_reference(cfg)).items() if k != "prediction_type"}
    T = int(cfg["num_steps"])
    if cfg["schedule"] == "cosine":
        return {"beta_schedule": "squaredcos_cap_v2", "num_steps": T, "beta_start": None, "beta_end": None}
    return {"beta_schedule": "linear", "num_steps": T, "beta_start": 1000 / T * 1e-4, "beta_end": 1000 / T * 0.02}


def same_schedule(a: dict, b: dict) -> bool:
    """Whether two schedule signatures describe the same betas (beta bounds to 1e-9 relative)."""
    close = lambda u, v: u == v or (isinstance(u, float) and isinstance(v, float) and math.isclose(u, v, rel_tol=1e-9))
    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)


def _gather(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] in x's dtype (at least float32: the float64 schedule rounded once) on x's device, shaped to broadcast over
    x's (B, C, H, W); a float64 run keeps float64 coefficients."""
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    return a.to(x.device)[t.to(x.device)].to(dtype).view(-1, *([1] * (x.dim() - 1)))


class Diffusion:
    """A discrete Gaussian diffusion process with T steps (buffers in float64 on the CPU, gathered per batch)."""

    def __init__(self, betas: torch.Tensor, model_t: torch.Tensor | None = None):
        self.betas = betas.to(torch.float64)
        self.num_steps = len(betas)
        self.alphas = 1 - self.betas
        self.abar = torch.cumprod(self.alphas, 0)
        self.abar_prev = torch.cat([self.abar.new_ones(1), self.abar[:-1]])
        # Ho et al. 2020, Eq. 7: variance and mean coefficients of q(x_{t-1} | x_t, x_0).
        self.posterior_var = self.betas * (1 - self.abar_prev) / (1 - self.abar)
        self.posterior_coef_x0 = self.betas * self.abar_prev.sqrt() / (1 - self.abar)
        self.posterior_coef_xt = (1 - self.abar_prev) * self.alphas.sqrt() / (1 - self.abar)
        # the timestep the networks see for each index of this (possibly respaced) process
        self.model_t = torch.arange(self.num_steps, device=betas.device) if model_t is None else model_t

    def to(self, device: torch.device | str) -> Diffusion:
        """Move the schedule buffers to `device` once, so gathering them in the training step copies nothing."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @classmethod
    def from_config(cls, cfg) -> Diffusion:
        """Build from a `diffusion` config group: {schedule: linear | cosine, num_steps}, or {schedule: pretrained,
        model: diffusers:PATH | hub:ORG/NAME} (the schedule of that model's scheduler config)."""
        if cfg["schedule"] == "pretrained":
            return cls(scheduler_betas(read_schedule(model_reference(cfg))))
        if int(cfg["num_steps"]) < 2:
            raise GuidelabError(f"diffusion.num_steps must be at least 2, got {cfg['num_steps']}")
        return cls(make_betas(cfg["schedule"], int(cfg["num_steps"])))

    def respace(self, keep: torch.Tensor) -> Diffusion:
        """The process on the timesteps `keep` (increasing), betas recomputed so that abar is unchanged on them:
        beta_i = 1 - abar_{S_i} / abar_{S_{i-1}} (Nichol & Dhariwal 2021, Sec. 4); its first step ends at abar = 1."""
        if len(keep) == self.num_steps:
            return self
        keep = keep.to(self.abar.device)
        abar = self.abar[keep]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return Diffusion(1 - abar / abar_prev, model_t=self.model_t[keep])

    # forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4)."""
        return _gather(self.abar.sqrt(), t, x0) * x0 + _gather((1 - self.abar).sqrt(), t, x0) * noise

    def eps_loss(
        self, model, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """L_simple = E_{t, eps} || eps - eps_theta(x_t, t, y) ||^2 with t uniform (Ho et al. 2020, Eq. 14)."""
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        eps = model(self.q_sample(x0, t, noise), t, y)
        return F.mse_loss(eps.float(), noise.float())

    def _noised(self, x0: torch.Tensor, generator: torch.Generator | None):
        """(t, eps, x_t) drawn as `eps_loss` draws them: t uniform, then eps, then x_t = q_sample(x0, t, eps)."""
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return t, noise, self.q_sample(x0, t, noise)

    def mg_loss(
        self,
        model,
        x0: torch.Tensor,
        y: torch.Tensor,
        w: float,
        p_uncond: float,
        null_class: int,
        frozen=None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Model guidance (Tang et al. 2025, "Diffusion Models without Classifier-free Guidance", arXiv 2502.12154):
        L_simple with the conditional rows' target replaced by `mg_target`, eps + w sg(eps(x_t, y) - eps(x_t, null));
        label dropout as in `eps_loss` (the rows dropped to the null class keep the target eps, so eps(x_t, null)
        stays the unconditional model, as in the authors' code). `model(x_t, t, labels)` is the prediction trained:
        the labels come dropped already, so its own dropout must be off (train_diffusion.py sees to it); `frozen`
        (default: `model`) gives the two stop-gradient predictions, cond and null as one doubled batch under
        torch.no_grad. The draws (t, eps, the dropped rows) are `eps_loss`'s, in its order: at w = 0 this is
        `eps_loss` bit for bit.

        Not done here, but in the authors' released training code (read in a fork, Peterande/Diffusion-wo-CFG,
        train.py; the paper itself could not be read offline): the stop-gradient predictions come from the EMA
        weights (train.py's loop hands a loss the online network only: train_diffusion.py uses the online weights,
        without dropout); w applies only below t = 0.75 on their linear flow path (sigma = t / (1 - t) < 3) and only
        after 100k steps of plain training (here: every step and timestep; a plain run resumed with
        train.guidance_free=mg is such a warm-up); their default w is 0.45 (mgw = 1.45, their s - 1)."""
        t, noise, x_t = self._noised(x0, generator)
        labels = drop_labels(y, p_uncond, null_class)
        sg = model if frozen is None else frozen
        with torch.no_grad():
            both = sg(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        eps_cond, eps_uncond = both.chunk(2)
        guided = mg_target(noise.float(), eps_cond.float(), eps_uncond.float(), w)
        target = torch.where((labels != null_class).view(-1, *[1] * (x0.dim() - 1)), guided, noise.float())
        return F.mse_loss(model(x_t, t, labels).float(), target)

    def gft_loss(
        self,
        model,
        x0: torch.Tensor,
        y: torch.Tensor,
        p_uncond: float,
        null_class: int,
        frozen=None,
        beta: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Guidance-free training (Chen et al. 2025, "Visual Generation Without Guidance", arXiv 2501.15420; the
        paper's section and equation numbers could not be checked offline, the loss is that of the authors' DiT code,
        thu-ml/GFT, DiT/diffusion/gaussian_diffusion.py, `training_losses`):
            || beta eps(x_t, y, beta) + (1 - beta) sg(eps(x_t, null, 1)) - eps ||^2    (`gft_mix`),
        beta uniform on (0, 1] per row (their code: U(0, 1); `beta` fixes it instead), the unconditional term held
        constant (their code: the online weights in eval mode under no_grad, as `frozen` is in train_diffusion.py).
        `model(x_t, t, labels, beta=...)` is the prediction trained and must not drop labels itself; `frozen`
        (default: `model`) gives the unconditional term under torch.no_grad.

        A row dropped to the null class has beta = 1, in the network's input and in the mix: eps(x_t, null, 1) is
        trained on the plain eps target, CFG's loss for the unconditional model. (Their code also feeds beta = 1 to
        the network for a dropped row, but mixes with the drawn beta, which scales that row's gradient by it.) At
        beta = 1 every row's prediction is eps(x_t, y, 1): L_simple of the conditional model, bit for bit."""
        t, noise, x_t = self._noised(x0, generator)
        labels = drop_labels(y, p_uncond, null_class)
        if beta is None:
            beta = 1 - torch.rand(y.shape[0], device=y.device, generator=generator)  # uniform on (0, 1]
        beta = beta.float()
        beta = torch.where(labels == null_class, torch.ones_like(beta), beta)
        sg = model if frozen is None else frozen
        with torch.no_grad():
            eps_uncond = sg(x_t, t, torch.full_like(y, null_class), beta=torch.ones_like(beta))
        eps = model(x_t, t, labels, beta=beta).float()
        mixed = gft_mix(eps, eps_uncond.float(), beta.view(-1, *[1] * (x0.dim() - 1)))
        return F.mse_loss(mixed, noise.float())

    # reverse process
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. 2020, Eq. 4 solved for x_0)."""
        return (x_t - _gather((1 - self.abar).sqrt(), t, x_t) * eps) / _gather(self.abar.sqrt(), t, x_t)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The inverse of `predict_x0`: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return (x_t - _gather(self.abar.sqrt(), t, x_t) * x0) / _gather((1 - self.abar).sqrt(), t, x_t)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eqs. 6-7)."""
        mean = _gather(self.posterior_coef_x0, t, x_t) * x0 + _gather(self.posterior_coef_xt, t, x_t) * x_t
        return mean, _gather(self.posterior_var, t, x_t)


# ---------------------------------------------------------------- guidance-free training
def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int) -> torch.Tensor:
    """Each label replaced by null_class with probability p_uncond (Ho & Salimans 2022, Alg. 1), drawn exactly as the
    networks' own `drop_labels` draws it, so a loss that drops labels itself keeps the training's random stream."""
    if p_uncond <= 0:
        return y
    drop = torch.rand(y.shape[0], device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def mg_target(noise: torch.Tensor, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Model guidance's regression target for the conditional prediction (Tang et al. 2025, arXiv 2502.12154; the
    paper's equation number could not be checked offline, the form is their released code's):
    eps' = eps + w (eps_theta(x_t, y) - eps_theta(x_t, null)), the bracket a constant (stop-gradient). Trained on its
    own predictions, eps_theta(x_t, y) settles where eps_c = E[eps | x_t, y] + w (eps_c - eps_u), i.e.
    eps_c = eps_u + (E[eps | x_t, y] - eps_u) / (1 - w): CFG at scale s = 1 / (1 - w), defined for w < 1 (beyond, the
    target runs away from itself). w = 0 is eps, bit for bit."""
    return noise + w * (eps_cond - eps_uncond)


def gft_mix(eps_beta: torch.Tensor, eps_uncond: torch.Tensor, beta) -> torch.Tensor:
    """GFT's conditional model written through its sampling model (Chen et al. 2025, arXiv 2501.15420; the equation
    number could not be checked offline, the form is their code's): eps_c = beta eps_s(x_t, y, beta) + (1 - beta)
    eps_u(x_t), the CFG combination eps_s = eps_u + (eps_c - eps_u) / beta solved for eps_c, so eps_s is CFG at scale
    1 / beta. beta = 1: eps_s itself, bit for bit."""
    return beta * eps_beta + (1 - beta) * eps_uncond


MG_W = Range(0, why="0 = plain L_simple; the one pass is CFG at scale 1 / (1 - w), e.g. train.mg_w=0.5 for 2")
GUIDANCE_FREE_RULE = OneOf(GUIDANCE_FREE, "none = L_simple, mg = model guidance, gft = guidance-free training")


def check_mg_w(w: float) -> None:
    """train.mg_w in [0, 1): model guidance's fixed point is CFG at 1 / (1 - w), which w >= 1 never reaches."""
    MG_W.check("train.mg_w", w, {})
    if w >= 1:
        raise GuidelabError(
            f"train.mg_w must be below 1, got {w:g}: the network learns CFG at scale 1 / (1 - w), which w >= 1 never "
            "reaches; e.g. train.mg_w=0.5 for scale 2"
        )


def trained_guidance(config: dict) -> tuple[str, float | None]:
    """What one pass of a checkpoint's network means, from its embedded config: ("none", 1.0) the conditional model
    (L_simple; also every checkpoint from before train.guidance_free), ("mg", 1 / (1 - w)) CFG at the scale model
    guidance trained into it, or ("gft", None): the scale is chosen when sampling, through beta = gft_beta(scale)."""
    train = config.get("train", {})
    kind = train.get("guidance_free", "none")
    if kind == "mg":
        return kind, 1 / (1 - float(train["mg_w"]))
    return kind, None if kind == "gft" else 1.0


def trained_label(config: dict) -> str | None:
    """The results row's `trained` column for a checkpoint's embedded config: None for L_simple, "mg w=W" for model
    guidance at train.mg_w = W (its one pass is CFG at s = 1 / (1 - W)), "gft" for guidance-free training. It keeps a
    model-guidance network's guidance=none rows apart from a plain network's in a merged report."""
    kind, _ = trained_guidance(config)
    return None if kind == "none" else f"mg w={float(config['train']['mg_w']):g}" if kind == "mg" else kind


def gft_beta(config: dict, scale: float) -> float:
    """The beta keyword of the one pass that samples a train.guidance_free=gft network like CFG at `scale`:
    unet(x, t, y, beta=1 / scale) (Chen et al. 2025: beta = 1 / s, trained on beta in (0, 1], so scale >= 1).
    Refused for a network trained otherwise, naming what its one pass is."""
    kind, trained = trained_guidance(config)
    if kind != "gft":
        what = f"CFG at scale {trained:g}: sample it with guidance=none" if kind == "mg" else "the conditional model"
        raise GuidelabError(
            f"this network was trained with train.guidance_free={kind}, without GFT's beta input: its one pass is "
            f"{what}"
        )
    if not scale >= 1:
        raise GuidelabError(f"a GFT network samples scales >= 1 (beta = 1 / scale in (0, 1]), got scale {scale:g}")
    return 1 / scale
