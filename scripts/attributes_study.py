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
    "baseline": "0: label only",
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
        for side in ("class", "attrs") if key == "baseline" else ("cfg_s1", "cfg", "cg", "cg_x0"):
            path = out / f"{key}_{side}" / "results.csv"
            if not path.is_file():
                continue
            unet = {"class": ", class-only UNet", "attrs": ", attribute UNet"}.get(side, "")
            for r in _rows(path):
                print(
                    f"| {label}{unet} | {r['guidance']} | {_f(r['s'], 0)} | {_f(r['nfe'], 0)} "
                    f"| {_f(r['classifier_nfe'], 0)} "
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
            seconds = float(timings.get(run, "nan")) * steps / total
            for r in _rows(sweep / "results.csv"):
                print(
                    f"| {side}, {r['guidance']} s={_f(r['s'], 0)} | {steps} | {steps * gflops:.0f} | {seconds:.0f} "
                    f"| {_f(r['joint_success'])} | {_f(r['thickness_mae'])} | {_f(r['accuracy'])} |"
                )


def split_table(out: Path) -> None:
    """The compositional split: joint success (the class by the ResNet, thickness within 0.5 px) and the mean measured
    thickness per request (7s of thickness 2.5, seen by every network; 3.5 and 4.5, held out of the split networks'
    data), the networks trained without the thickest fifth of the 7s beside those trained on everything, and fid_bin
    (the samples against real 7s of their own thickness bin)."""
    print("| networks | mode | s | joint success 2.5 / 3.5 / 4.5 | measured thickness 2.5 / 3.5 / 4.5 | fid_bin |")
    print("|---|---|---|---|---|---|")
    for nets in ("full", "split"):
        for side in ("cfg_s1", "cfg", "cg"):
            sweep = out / f"sevens_{nets}_{side}"
            if not (sweep / "results.csv").is_file():
                continue
            for r in _rows(sweep / "results.csv"):
                found = json.loads((sweep / r["run"] / "metrics.json").read_text())["attributes"]
                success = found["joint_success_by_request"]
                asked = ("2.5", "3.5", "4.5")
                joint = " / ".join(f"{success[f'7 thickness={v}']:.2f}" for v in asked)
                thick = " / ".join(f"{found['thickness_by_request'][v]:.2f}" for v in asked)
                what = "trained without thick 7s" if nets == "split" else "trained on everything"
                print(f"| {what} | {r['guidance']} | {_f(r['s'], 0)} | {joint} | {thick} | {_f(r['fid_bin'], 1)} |")


def figure(out: Path, path: Path) -> None:
    """One sample per digit (columns) for each thickness x slant asked (rows) of the three-condition request, joint CFG
    (s = 3) beside composed CG (s = 10), labelled: the figure of docs/results.md."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from guidelab.conditions import combinations
    from guidelab.images import grid

    panels, names = [], []
    for job in (out / "three_cfg" / "0_cfg_s3.0", out / "three_cg" / "1_cg_s10.0"):
        images = np.load(job / "samples.npz")["images"]
        cfg = json.loads((job / "metrics.json").read_text())
        n = cfg["num_samples"]
        y = rows_of(job, n)
        index, conds = combinations(y, None, 10)
        index = np.array(index)
        lines = []
        for c in range(0, len(conds), 10):  # the ten digits of one thickness x slant
            lines.append(np.stack([images[index == c + d][0] for d in range(10)]))
            names.append(conds[c].split(" ", 1)[1]) if job.parent.name == "three_cfg" else None
        panels.append(grid(lines, pad=1, scale=2))
    img = np.concatenate([panels[0], np.zeros((panels[0].shape[0], 12, 1), np.uint8), panels[1]], axis=1)[..., 0]
    canvas = Image.new("L", (img.shape[1] + 150, img.shape[0] + 16))
    canvas.paste(Image.fromarray(img), (150, 16))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    row_h = (img.shape[0] - 2) / len(names)
    for i, name in enumerate(names):
        draw.text((4, 16 + 2 + i * row_h + row_h / 2 - 5), name, fill=255, font=font)
    draw.text((150, 2), "joint CFG, s = 3 (UNet trained on the attributes)", fill=255, font=font)
    draw.text((150 + panels[0].shape[1] + 12, 2), "composed CG, s = 10 (class-only UNet)", fill=255, font=font)
    canvas.save(path)


def rows_of(job: Path, n: int):
    """The condition rows a job of the study asked for, from its overrides (the one place a request is read)."""
    from omegaconf import OmegaConf

    from guidelab.conditions import requested
    from guidelab.drawing import _given

    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    labels = OmegaConf.to_container(cfg.labels) if OmegaConf.is_list(cfg.labels) else cfg.labels
    return requested(labels, _given(cfg.attrs), n, 10)[0]


def main(out: str, fig: str | None = None) -> None:
    out = Path(out)
    if fig:
        figure(out, Path(fig))
    modes_table(out)
    print()
    price_table(out)
    print()
    split_table(out)
    print()
    print(
        "Wall times (timings.txt):",
        json.dumps(dict(re.findall(r"(\S+) trained in (\d+) s", (out / "timings.txt").read_text()))),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
