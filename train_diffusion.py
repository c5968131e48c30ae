"""Train the class-conditional diffusion UNet (label dropout gives it a null class for CFG).

    python train_diffusion.py dataset=cifar10     # the dataset names its model (unet_cifar); model=NAME wins
    python train_diffusion.py experiment=demo     # a preset: configs/train_diffusion/experiment/demo.yaml

The loop (optimizer, EMA, checkpoints, resume, DDP, logging) is guidelab.train's; this script says what is trained.
"""

from pathlib import Path

import torch

from guidelab.cli import main
from guidelab.data import ImageData, dataset_shape
from guidelab.diffusion import Diffusion
from guidelab.guidance import make_eps_fn, resolve
from guidelab.images import save_class_grid, to_uint8
from guidelab.models import build_unet
from guidelab.sampling import sample
from guidelab.train import Task, train, validate


def network(cfg, channels: int, num_classes: int):
    """The network the `model` config describes (guidelab's UNet, or a diffusers layout; each checks its arguments)."""
    return build_unet(cfg.model, channels, cfg.dataset.image_size, num_classes)


def preview_guidance(cfg):
    """The preview grids' guidance: CFG at train.eval_scale, or the model itself where it is unconditional (a diffusers
    layout with model.conditional=false)."""
    if not cfg.model.get("conditional", True):
        return resolve("none", base="uncond")
    return resolve("cfg", cfg.train.eval_scale)


def task(cfg, data: ImageData, device: torch.device) -> Task:
    """eps_theta(x_t, t, y) trained with L_simple (Ho et al. 2020) and label dropout (Ho & Salimans 2022, Alg. 1);
    the periodic evaluation is a CFG preview grid (DDIM, one row of 8 per class, the same noise every time)."""
    channels, num_classes, size = data.info["channels"], data.num_classes, cfg.dataset.image_size
    diffusion = Diffusion.from_config(cfg.diffusion).to(device)
    preview = preview_guidance(cfg)

    def evaluate(ema_model, step: int, run_dir: Path) -> dict:
        y = torch.arange(num_classes, device=device).repeat_interleave(8)
        noise = torch.randn(
            (len(y), channels, size, size),
            device=device,
            generator=torch.Generator(device=device).manual_seed(cfg.seed),
        )
        x = sample("ddim", make_eps_fn(preview, ema_model, y), diffusion, noise, cfg.train.eval_steps, "linspace")
        path = run_dir / "samples" / f"{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_class_grid(to_uint8(x), y.cpu().numpy(), num_classes, path, per_row=8, class_names=data.class_names)
        return {"_image": path}

    return Task(network(cfg, channels, num_classes), lambda net, x0, y: (diffusion.eps_loss(net, x0, y), {}), evaluate)


def check(cfg) -> None:
    """The training options, and the UNet's own arguments (built on the meta device: no memory, no time)."""
    validate(cfg)
    preview_guidance(cfg)  # the preview grids' CFG scale
    channels, class_names = dataset_shape(cfg.dataset)  # dataset=folder: its root and class folders, read now
    with torch.device("meta"):
        network(cfg, channels, len(class_names))


if __name__ == "__main__":
    main(
        Path(__file__).parent / "configs",
        "train_diffusion",
        lambda cfg, run_dir: train(cfg, "diffusion", run_dir, task),
        protect="checkpoints",
        check=check,
    )
