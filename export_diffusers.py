"""Export a run whose model is a diffusers layout (`model=diffusers_tiny`, or any model option with `arch: diffusers`)
as a diffusers pipeline directory, so that diffusers (`DDPMPipeline.from_pretrained(DIR)`) and guidelab
(`ckpt=diffusers:DIR`) both load it:

    python export_diffusers.py RUN/checkpoints/last.pt DIR

DIR gets `unet/` (the EMA weights, UNet2DModel.save_pretrained), `scheduler/` (a DDPMScheduler config of the run's
noise schedule), `model_index.json`, and `guidelab.json` (data set, image size, class names and the null class, which
diffusers' config cannot hold: with it CFG works on the export). An existing non-empty DIR is refused.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from guidelab.errors import GuidelabError
from guidelab.models.diffusers_unet import DiffusersUNet
from guidelab.networks import load, schedule_of
from guidelab.pretrained import SIDECAR, import_diffusers


def export(ckpt_path: str, out: str) -> Path:
    """Write the pipeline directory `out` (through a temporary sibling, renamed at the end) and return it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GuidelabError(f"{out} exists and is not an empty directory; pass a new one (nothing is overwritten)")
    net, ckpt = load(ckpt_path, "diffusion", torch.device("cpu"))
    if not isinstance(net, DiffusersUNet):
        raise GuidelabError(
            f"{ckpt_path} holds guidelab's UNet; only runs of a diffusers layout export to diffusers "
            "(train one with model=diffusers_tiny or another model option with arch: diffusers)"
        )
    diffusers = import_diffusers()
    config, schedule = ckpt["config"], schedule_of(ckpt["config"])
    bounds = {} if schedule["beta_start"] is None else {k: schedule[k] for k in ("beta_start", "beta_end")}
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=schedule["num_steps"], beta_schedule=schedule["beta_schedule"], **bounds
    )
    tmp = out.with_name(f".{out.name}.export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    diffusers.DDPMPipeline(unet=net.model, scheduler=scheduler).save_pretrained(tmp)
    info = config["data_info"]
    sidecar = {
        "dataset": config["dataset"]["name"],
        "image_size": config["dataset"]["image_size"],
        "num_classes": info["num_classes"],
        "class_names": info.get("class_names"),
        "null_class": net.null_class,
        "p_uncond": config["model"].get("p_uncond"),
        "exported_from": str(Path(ckpt_path).resolve()),
    }
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a checkpoint of a run with a diffusers layout (RUN/checkpoints/last.pt)")
    parser.add_argument("out", help="the new pipeline directory")
    args = parser.parse_args(argv)
    try:
        path = export(args.ckpt, args.out)
    except GuidelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (unet/, scheduler/, model_index.json, {SIDECAR}); sample it with ckpt=diffusers:{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
