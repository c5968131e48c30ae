"""Train a time-conditioned noisy classifier for classifier guidance, or (classifier=evaluator) the clean-image
evaluator that judges samples.

    python train_classifier.py dataset=mnist
    python train_classifier.py dataset=mnist classifier=evaluator
"""
from pathlib import Path

from guidelab.cli import main
from guidelab.train import train

if __name__ == "__main__":
    main(Path(__file__).parent / "configs", "train_classifier", lambda cfg, run_dir: train(cfg, "classifier", run_dir),
         groups=("dataset", "classifier", "diffusion", "logger", "experiment"), protect="checkpoints")
