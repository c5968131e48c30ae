"""The guidance-free training losses (`train.guidance_free`), which train a class-conditional network whose single pass
samples like CFG: model guidance (`mg_loss`) and guidance-free training (`gft_loss`), beside L_simple
(`Diffusion.eps_loss`); `trained_guidance` tells sampling what such a network's one pass means."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guidelab.conditions import drop_labels
from guidelab.diffusion import Diffusion
from guidelab.errors import GuidelabError
from guidelab.registry import OneOf, Range

GUIDANCE_FREE = ("none", "mg", "gft")  # train.guidance_free: L_simple, model guidance, guidance-free training


def mg_loss(
    diffusion: Diffusion,
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
    label dropout as in `Diffusion.eps_loss` (the rows dropped to the null class keep the target eps, so eps(x_t, null)
    stays the unconditional model, as in the authors' code). `model(x_t, t, labels)` is the prediction trained:
    the labels come dropped already, so its own dropout must be off (train_diffusion.py sees to it); `frozen`
    (default: `model`) gives the two stop-gradient predictions, cond and null as one doubled batch under
    torch.no_grad. The draws (t, eps, the dropped rows) are `Diffusion.eps_loss`'s, in its order: at w = 0 this is
    `Diffusion.eps_loss` bit for bit.

    Not done here, but in the authors' released training code (read in a fork, Peterande/Diffusion-wo-CFG,
    train.py; the paper itself could not be read offline): the stop-gradient predictions come from the EMA
    weights (train.py's loop hands a loss the online network only: train_diffusion.py uses the online weights,
    without dropout); w applies only below t = 0.75 on their linear flow path (sigma = t / (1 - t) < 3) and only
    after 100k steps of plain training (here: every step and timestep; a plain run resumed with
    train.guidance_free=mg is such a warm-up); their default w is 0.45 (mgw = 1.45, their s - 1)."""
    t, noise, x_t = diffusion.noised(x0, generator)
    labels = drop_labels(y, p_uncond, null_class)
    sg = model if frozen is None else frozen
    with torch.no_grad():
        both = sg(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    eps_cond, eps_uncond = both.chunk(2)
    guided = mg_target(noise.float(), eps_cond.float(), eps_uncond.float(), w)
    target = torch.where((labels != null_class).view(-1, *[1] * (x0.dim() - 1)), guided, noise.float())
    return F.mse_loss(model(x_t, t, labels).float(), target)


def gft_loss(
    diffusion: Diffusion,
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
    t, noise, x_t = diffusion.noised(x0, generator)
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
    guidance trained into it, or ("gft", None): the scale is chosen when sampling (guidance=gft: beta = 1 / scale)."""
    train = config.get("train", {})
    kind = train.get("guidance_free", "none")
    if kind == "mg":
        return kind, 1 / (1 - float(train["mg_w"]))
    return kind, None if kind == "gft" else 1.0
