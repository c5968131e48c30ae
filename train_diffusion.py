"""Train the class-conditional diffusion UNet (label dropout gives it a null class for CFG).

    python train_diffusion.py dataset=cifar10     # the dataset names its model (unet_cifar); model=NAME wins
    python train_diffusion.py experiment=demo     # a preset: configs/train_diffusion/experiment/demo.yaml
    python train_diffusion.py experiment=demo train.guidance_free=mg train.mg_w=0.5   # one pass = CFG at scale 2
    python train_diffusion.py experiment=demo train.guidance_free=gft model.beta_embed=true  # beta = 1 / scale

The loop (optimizer, EMA, checkpoints, resume, DDP, logging) is guidelab.train's; this script says what is trained.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from guidelab import checkpoint
from guidelab.attributes import check_defined, statistics
from guidelab.cli import main
from guidelab.data import ImageData, dataset_shape
from guidelab.diffusion import Diffusion
from guidelab.errors import GuidelabError
from guidelab.guidance import make_eps_fn, resolve
from guidelab.guided import Guided
from guidelab.images import save_class_grid, to_uint8
from guidelab.losses import GUIDANCE_FREE_RULE, check_mg_w, gft_loss, mg_loss
from guidelab.models import build_unet, check_buildable
from guidelab.sampling import sample
from guidelab.schedules import process
from guidelab.train import Task, train, validate


def network(cfg, channels: int, num_classes: int):
    """The network the `model` config describes (guidelab's UNet, or a diffusers layout; each checks its arguments)."""
    return build_unet(cfg.model, channels, cfg.dataset.image_size, num_classes)


def preview_guidance(cfg):
    """The preview grids' guidance: CFG at train.eval_scale, or the model itself where it is unconditional (a diffusers
    layout with model.conditional=false) or guided by its training (train.guidance_free=mg: its one pass; gft: its
    one pass at beta = 1 / train.eval_scale, see `preview_eps_fn`)."""
    if not cfg.model.get("conditional", True):
        return resolve("none", base="uncond")
    if cfg.train.get("guidance_free", "none") != "none":
        resolve("cfg", cfg.train.eval_scale)  # checks the scale
        return resolve("none", base="cond")
    return resolve("cfg", cfg.train.eval_scale)


def preview_eps_fn(cfg, ema_model, y: torch.Tensor):
    """The preview grids' eps-function: `preview_guidance`'s, or for a GFT network its one pass at beta = 1 / s."""
    if cfg.train.get("guidance_free", "none") == "gft":
        beta = 1 / cfg.train.eval_scale
        return lambda x, t: Guided(ema_model(x, t, y, beta=beta))
    return make_eps_fn(preview_guidance(cfg), ema_model, y)


def check_guidance_free(cfg) -> None:
    """train.guidance_free and its keys, and the network they need: label dropout (the null class both losses
    subtract), and for gft guidelab's UNet with its beta input (model.beta_embed=true)."""
    tc, mc = cfg.train, cfg.model
    kind = tc.get("guidance_free", "none")
    GUIDANCE_FREE_RULE.check("train.guidance_free", kind, tc)
    check_mg_w(tc.get("mg_w", 0.0))
    if kind == "none":
        return
    if mc.get("attributes"):
        raise GuidelabError(
            f"train.guidance_free={kind} trains class-only networks; with model.attributes use train.guidance_free=none"
        )
    if not mc.get("conditional", True) or not mc.get("p_uncond", 0) > 0:
        raise GuidelabError(
            f"train.guidance_free={kind} trains the null class by label dropout: it needs a class-conditional model "
            "with model.p_uncond > 0 (e.g. model.p_uncond=0.1)"
        )
    diffusers = mc.get("arch", "unet") != "unet"
    if kind == "gft" and (diffusers or not mc.get("beta_embed", False)):
        raise GuidelabError(
            "train.guidance_free=gft conditions the network on beta: it needs guidelab's UNet with "
            "model.beta_embed=true" + (f" (model={mc.name} is a diffusers layout)" if diffusers else "")
        )
    if kind == "gft" and tc.eval_scale < 1:
        raise GuidelabError(
            f"train.eval_scale must be >= 1 for the GFT preview (beta = 1 / scale in (0, 1]), got {tc.eval_scale:g}"
        )


@contextmanager
def labels_dropped_by_the_loss(model):
    """The guidance-free losses drop labels themselves (they must know which rows are null): the network's own label
    dropout is off meanwhile. Yields the label-dropout rate."""
    p_uncond, model.p_uncond = model.p_uncond, 0.0
    try:
        yield p_uncond
    finally:
        model.p_uncond = p_uncond


def frozen_predictions(model):
    """The stop-gradient predictions of the guidance-free losses (called under torch.no_grad): the online weights in
    eval mode, without dropout (the loop hands a loss no EMA weights); the network's mode is restored after."""

    def frozen(x, t, labels, **kwargs):
        training = model.training
        model.eval()
        try:
            return model(x, t, labels, **kwargs)
        finally:
            model.train(training)

    return frozen


def training_loss(cfg, diffusion: Diffusion, model):
    """loss(net, x0, y) -> (loss, stats) of train.guidance_free: L_simple (none; exactly as before the option), model
    guidance (mg) or guidance-free training (gft), see guidelab.diffusion; `model` is the network `net` runs."""
    kind = cfg.train.get("guidance_free", "none")
    if kind == "none":
        return lambda net, x0, y: (diffusion.eps_loss(net, x0, y), {})
    frozen = frozen_predictions(model)

    def loss(net, x0, y):
        with labels_dropped_by_the_loss(model) as p_uncond:
            if kind == "mg":
                return mg_loss(diffusion, net, x0, y, cfg.train.mg_w, p_uncond, model.null_class, frozen), {}
            return gft_loss(diffusion, net, x0, y, p_uncond, model.null_class, frozen), {}

    return loss


def task(cfg, data: ImageData, device: torch.device) -> Task:
    """eps_theta(x_t, t, y) trained with L_simple (Ho et al. 2020) and label dropout (Ho & Salimans 2022, Alg. 1), or
    a guidance-free loss (`training_loss`); the periodic evaluation is a CFG preview grid (DDIM, one row of 8 per
    class, the same noise every time; a guidance-free network's own one pass)."""
    channels, num_classes, size = data.info["channels"], data.num_classes, cfg.dataset.image_size
    diffusion = process(cfg.diffusion).to(device)
    check_guidance_free(cfg)

    def evaluate(ema_model, step: int, run_dir: Path) -> dict:
        y = torch.arange(num_classes, device=device).repeat_interleave(8)
        noise = torch.randn(
            (len(y), channels, size, size),
            device=device,
            generator=torch.Generator(device=device).manual_seed(cfg.seed),
        )
        x = sample("ddim", preview_eps_fn(cfg, ema_model, y), diffusion, noise, cfg.train.eval_steps, "linspace")
        path = run_dir / "samples" / f"{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_class_grid(to_uint8(x), y.cpu().numpy(), num_classes, path, per_row=8, class_names=data.class_names)
        return {"_image": path}

    model = network(cfg, channels, num_classes)
    if cfg.train.get("init_from"):  # fine-tuning: a checkpoint's weights, the attribute inputs it lacks fresh
        start_from(model, cfg.train.init_from, cfg)
    if getattr(model, "attributes", ()):  # the training statistics normalise the attributes, saved with the weights
        stats = statistics(data.attributes, model.attributes)
        model.attr_stats.copy_(torch.tensor([[stats[n][k] for n in model.attributes] for k in ("mean", "std")]))
    return Task(model, training_loss(cfg, diffusion, model), evaluate)


def start_from(model, path: str, cfg) -> None:
    """train.init_from: a diffusion checkpoint's EMA weights as this run's start (fine-tuning), checked to be of the
    same data set and noise schedule. Only inputs the checkpoint's network lacks may start fresh: the attribute
    embeddings of a class-only network fine-tuned with model.attributes (the price of retraining for CFG)."""
    ckpt = checkpoint.load(path, kind="diffusion")
    for key in ("dataset", "diffusion"):
        if ckpt["config"][key] != OmegaConf.to_container(cfg[key], resolve=True):
            raise GuidelabError(
                f"train.init_from={path} was trained with another {key} config ({ckpt['config'][key]}); start from a "
                f"network of this {key}, or match {key}=... to it"
            )
    try:
        missing, unexpected = model.load_state_dict(ckpt["ema"], strict=False)
    except RuntimeError:
        missing, unexpected = ["?"], ["(weights of another shape)"]
    fresh = [k for k in missing if k.startswith("attr_")]
    if unexpected or len(fresh) < len(missing):
        differ = ", ".join(sorted(set(missing) - set(fresh)) + list(unexpected))[:200]
        raise GuidelabError(
            f"train.init_from={path} does not fit this model (its network differs beyond the attribute inputs: "
            f"{differ}); use the same model=... and sizes"
        )
    print(f"train.init_from: the weights of {path} (step {ckpt['step']}); new: {', '.join(fresh) or 'none'}")


def check(cfg) -> None:
    """The training options, and the UNet's own arguments (built on the meta device: no memory, no time)."""
    validate(cfg)
    check_guidance_free(cfg)
    preview_guidance(cfg)  # the preview grids' CFG scale
    channels, class_names = dataset_shape(cfg.dataset)  # dataset=folder: its root and class folders, read now
    if cfg.model.get("attributes"):
        check_defined(cfg.dataset, f"model.attributes={list(cfg.model.attributes)}")
    check_buildable("model", cfg.model, lambda: network(cfg, channels, len(class_names)))


if __name__ == "__main__":
    main(
        Path(__file__).parent / "configs",
        "train_diffusion",
        lambda cfg, run_dir: train(cfg, "diffusion", run_dir, task),
        protect="checkpoints",
        check=check,
    )
