"""Sample from a trained diffusion UNet with or without guidance.

    python sample.py ckpt=RUN/checkpoints/last.pt guidance=cfg scale=3.0
    python sample.py ckpt=... guidance=cg classifier_ckpt=CLS/checkpoints/last.pt scale=3.0
"""
from pathlib import Path

from guidelab.cli import main
from guidelab.generate import generate

if __name__ == "__main__":
    main(Path(__file__).parent / "configs", "sample", generate,
         groups=("guidance", "sampler", "logger", "experiment"), protect="samples", aliases={"eval": "eval.enabled"})
