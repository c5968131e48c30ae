"""Train a diffusers UNet2DModel the way a diffusers user would, with none of guidelab's training code: a plain loop
over DDPMScheduler.add_noise and get_velocity, then UNet2DModel.save_pretrained + the scheduler's save_pretrained.
It makes "a model guidelab did not train" for the checks of classifier guidance on other schedules and prediction
types (docs/results.md, "Classifier guidance on every schedule"; tests/test_cg_schedules.py).

    python scripts/train_diffusers_plain.py OUT_DIR [--schedule squaredcos_cap_v2] [--prediction v_prediction]
        [--steps 1500] [--size 16] [--zero-snr]

Data: guidelab's bundled MNIST digits (mnist5k, training split) at --size pixels, in [-1, 1].
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def train(
    out: Path,
    schedule: str = "squaredcos_cap_v2",
    prediction: str = "v_prediction",
    steps: int = 1500,
    size: int = 16,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    zero_snr: bool = False,
    channels: tuple = (32, 64, 64),  # per resolution level: (32, 64, 64) is the 1.1M model of the demo's size
    log_every: int = 250,
) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    from guidelab.data import load_from_config

    torch.manual_seed(seed)
    data = load_from_config({"name": "mnist5k", "image_size": size}, "train").images  # (N, 1, S, S) in [-1, 1]
    down = ["DownBlock2D"] * len(channels)
    down[1] = "AttnDownBlock2D"  # attention at the second level (8x8 for 16x16 images, 4x4 for 8x8)
    up = [name.replace("Down", "Up") for name in reversed(down)]
    model = UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        attention_head_dim=16,
        norm_num_groups=min(16, channels[0]),
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=schedule,
        prediction_type=prediction,
        rescale_betas_zero_snr=zero_snr,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    for step in range(steps):
        x0 = data[torch.randint(0, len(data), (batch_size,))]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch_size,))
        x_t = scheduler.add_noise(x0, noise, t)
        target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction]
        loss = F.mse_loss(model(x_t, t).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.load_state_dict(ema)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--schedule", default="squaredcos_cap_v2")
    parser.add_argument("--prediction", default="v_prediction")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-snr", action="store_true")
    args = parser.parse_args()
    train(args.out, args.schedule, args.prediction, args.steps, args.size, seed=args.seed, zero_snr=args.zero_snr)
    print(f"wrote {args.out}/unet and {args.out}/scheduler; sample it with ckpt=diffusers:{args.out}")


if __name__ == "__main__":
    main()
