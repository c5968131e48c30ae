"""Train the class-conditional diffusion UNet (label dropout gives it a null class for CFG).

    python train_diffusion.py dataset=mnist model=unet_small
"""
from pathlib import Path

from guidelab.cli import main
from guidelab.train import train

if __name__ == "__main__":
    main(Path(__file__).parent / "configs", "train_diffusion", lambda cfg, run_dir: train(cfg, "diffusion", run_dir),
         groups=("dataset", "model", "diffusion", "logger", "experiment"), protect="checkpoints")
