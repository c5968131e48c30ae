"""Print the attribute study's tables (docs/results.md, "Attributes") from the run dir of scripts/attributes_study.sh:
the modes for 1, 2 and 3 conditions and outside the training range at their measured compute, and the price of
retraining (joint success against the training compute each side spent on the new attribute).

    python scripts/attributes_study.py OUT
"""

import csv
import json
import re
import sys
from pathlib import Path

import torch

REQUESTS = {
    "one": "1: thickness",
    "two": "2: label + thickness",
    "three": "3: label + thickness + slant",
    "outside": "3, outside (thickness 5.5, slant 0.8)",
}


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _f(value, digits: int = 2) -> str:
    return "" if value in ("", None) else f"{float(value):.{digits}f}"


def modes_table(out: Path) -> None:
    print(
        "| conditions | mode | s | UNet NFE | guide NFE | GFLOPs / sample | s / sample | thickness MAE (px) "
        "| thickness slope | slant MAE (rad) | joint success | acc. ResNet | acc. k-NN | FID | free spread |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, label in REQUESTS.items():
        for side in ("cfg_s1", "cfg", "cg"):
            path = out / f"{key}_{side}" / "results.csv"
            if not path.is_file():
                continue
            for r in _rows(path):
                print(
                    f"| {label} | {r['guidance']} | {_f(r['s'], 0)} | {_f(r['nfe'], 0)} | {_f(r['classifier_nfe'], 0)} "
                    f"| {_f(r['gflops_per_sample'])} | {_f(r['seconds_per_sample'], 3)} | {_f(r['thickness_mae'])} "
                    f"| {_f(r['thickness_slope'])} | {_f(r['slant_mae'], 3)} | {_f(r['joint_success'])} "
                    f"| {_f(r['accuracy'])} | {_f(r['accuracy_knn'])} | {_f(r['fid'], 1)} | {_f(r['free_spread'])} |"
                )


def training_flops(ckpt_path: Path) -> tuple[float, int]:
    """(GFLOPs of one training step, its batch) of the network in a checkpoint: one forward and backward pass of a
    batch, counted by torch.utils.flop_counter (`guidelab.guided.measured_flops`)."""
    from guidelab import checkpoint
    from guidelab.guided import measured_flops
    from guidelab.models import build_classifier, build_unet

    ckpt = checkpoint.load(ckpt_path)
    cfg, info = ckpt["config"], ckpt["config"]["data_info"]
    size, batch = cfg["dataset"]["image_size"], cfg["train"]["batch_size"]
    if "model" in cfg:
        net = build_unet(cfg["model"], info["channels"], size, info["num_classes"])
        inputs = (torch.randn(batch, info["channels"], size, size), torch.randint(0, 1000, (batch,)))
        inputs += (torch.randint(0, info["num_classes"], (batch,)),)
    else:
        net = build_classifier(cfg["classifier"], info["channels"], size, info["num_classes"])
        inputs = (torch.randn(batch, info["channels"], size, size), torch.randint(0, 1000, (batch,)))
    return measured_flops(lambda: net(*inputs).float().square().mean().backward()) / 1e9, batch


def price_table(out: Path) -> None:
    """Joint success of label + thickness against the training compute spent on thickness: fine-tuning the class-only
    UNet with the new input (CFG at s = 3) or training the thickness regressor (the class by the UNet's CFG at s = 3,
    thickness by the regressor at weight 10). Compute = steps x the counted GFLOPs of one training step; seconds from
    timings.txt scaled by the share of steps (the runs save every 100 or 250 steps)."""
    timings = dict(re.findall(r"(\S+) trained in (\d+) s", (out / "timings.txt").read_text()))
    print(
        "| side | training steps | training GFLOPs | training seconds | joint success | thickness MAE | acc. ResNet |"
    )
    print("|---|---|---|---|---|---|---|")
    for side, run in (("CFG: fine-tune the UNet", "finetune"), ("CG: train a regressor", "regressor_price")):
        last = out / run / "checkpoints" / "last.pt"
        if not last.is_file():
            continue
        gflops, _ = training_flops(last)
        total = torch.load(last, weights_only=True, map_location="cpu")["step"]
        prefix = "price_cfg_" if run == "finetune" else "price_cg_"
        for sweep in sorted(out.glob(f"{prefix}*")):
            tag = sweep.name[len(prefix) :]
            steps = total if tag == "last" else int(tag)
            (r,) = _rows(sweep / "results.csv")
            seconds = float(timings.get(run, "nan")) * steps / total
            print(
                f"| {side} | {steps} | {steps * gflops:.0f} | {seconds:.0f} | {_f(r['joint_success'])} "
                f"| {_f(r['thickness_mae'])} | {_f(r['accuracy'])} |"
            )


def main(out: str) -> None:
    out = Path(out)
    modes_table(out)
    print()
    price_table(out)
    print()
    print(
        "Wall times (timings.txt):",
        json.dumps(dict(re.findall(r"(\S+) trained in (\d+) s", (out / "timings.txt").read_text()))),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
