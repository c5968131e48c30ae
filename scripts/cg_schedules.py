"""Classifier guidance on every schedule: one table of (model, sampler, grid) -> accuracy and FID, read by the ResNet
judge (FID in its features against the real test split) and by the k-NN judge, for docs/results.md.

    python scripts/cg_schedules.py OUT [--scales 3 10] [--num 200] [--unguided]

OUT holds what scripts/cg_schedules.sh trains: lin/{diffusion,classifier} (guidelab's UNet, linear schedule, eps),
cos/{diffusion,classifier} (guidelab's UNet, cosine, eps), vcos/ + vcos_classifier/ (a diffusers UNet2DModel trained
by a plain diffusers loop: cosine, v-prediction) and evaluator/ (the ResNet). Every run draws the same noise (seed 0)
for the same labels (num / 10 of each digit). Run it with PYTHONPATH pointing at another checkout's src/ to read that
code's samples (the "before" columns of docs/results.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from guidelab import guidance, networks, sampling
from guidelab.images import to_uint8
from guidelab.knn import knn_judge
from guidelab.metrics import evaluate_samples, evaluator_settings
from guidelab.schedules import process

GRIDS = [  # (sampler, steps, spacing): the default, the grids that start at t = T - 1, leading, and DDPM
    ("ddim", 25, "linspace"),
    ("ddim", 25, "trailing"),
    ("ddim", 25, "leading"),
    ("dpmpp_2m", 20, "logsnr"),
    ("heun", 10, "logsnr"),
    ("ddpm", 100, "linspace"),
]
MODELS = {  # name: (diffusion checkpoint or reference, noisy classifier)
    "guidelab UNet, linear, eps": ("lin/diffusion/checkpoints/last.pt", "lin/classifier/checkpoints/last.pt"),
    "guidelab UNet, cosine, eps": ("cos/diffusion/checkpoints/last.pt", "cos/classifier/checkpoints/last.pt"),
    "diffusers UNet2DModel, cosine, v": ("diffusers:{out}/vcos", "vcos_classifier/checkpoints/last.pt"),
}


def judge_all(images, y, out: Path, judge, device) -> tuple[float, float, float]:
    """(ResNet accuracy, FID in its features, k-NN accuracy) of uint8 samples for the labels y."""
    metrics = evaluator_settings(out / "cache")
    data = {"name": "mnist5k", "image_size": 16}
    scores = evaluate_samples(images, y, metrics, data, judge, str(out / "evaluator/checkpoints/last.pt"), device)
    knn = knn_judge(images, y, data, 10, out / "cache", device)
    return scores["accuracy"], scores["fid"], knn["accuracy_knn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 10.0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--unguided", action="store_true", help="only the unguided runs, on every grid")
    args = parser.parse_args()
    out, cpu = args.out.resolve(), torch.device("cpu")
    judge, _ = networks.load(out / "evaluator/checkpoints/last.pt", "classifier", cpu)
    y = torch.arange(10).repeat(args.num // 10)
    noise = torch.randn((len(y), 1, 16, 16), generator=torch.Generator().manual_seed(0))
    print("| model | s | sampler | grid | accuracy (ResNet) | FID (ResNet features) | accuracy (k-NN) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (ckpt, classifier) in MODELS.items():
        unet, record = networks.load(
            ckpt.format(out=out) if ckpt.startswith("diffusers") else out / ckpt, "diffusion", cpu
        )
        clf, _ = networks.load(out / classifier, "classifier", cpu)
        diffusion = process(record["config"]["diffusion"])
        runs = [("none", 1.0, GRIDS[0])] + [("cg", s, grid) for s in args.scales for grid in GRIDS]
        runs = [("none", 1.0, grid) for grid in GRIDS] if args.unguided else runs
        for mode, scale, (sampler, steps, spacing) in runs:
            spec = guidance.resolve(mode, scale, base="uncond")
            t0 = time.perf_counter()
            eps_fn = guidance.make_eps_fn(spec, unet, y, clf, diffusion)
            x = sampling.sample(
                sampler, eps_fn, diffusion, noise, steps, spacing, True, torch.Generator().manual_seed(1)
            )
            seconds = time.perf_counter() - t0
            acc, fid, knn = judge_all(to_uint8(x), y.numpy(), out, judge, cpu)
            label = "unguided" if mode == "none" else f"{scale:g}"
            cells = [
                name,
                label,
                sampler,
                f"{spacing} {steps}",
                f"{acc:.3f}",
                f"{fid:.2f}",
                f"{knn:.3f}",
                f"{seconds:.0f}",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
