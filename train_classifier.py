"""Train a time-conditioned noisy classifier for classifier guidance, or (classifier=evaluator) the clean-image
evaluator that judges samples.

    python train_classifier.py dataset=cifar10
    python train_classifier.py dataset=cifar10 classifier=evaluator

The loop (optimizer, EMA, checkpoints, resume, DDP, logging) is guidelab.train's; this script says what is trained.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from guidelab.cli import main
from guidelab.data import ImageData, dataset_info
from guidelab.diffusion import Diffusion
from guidelab.models import build_classifier
from guidelab.train import Task, load_data, train, validate


def network(cfg, channels: int, num_classes: int):
    """The classifier the `classifier` config describes (guidelab.models.NoisyClassifier)."""
    return build_classifier(cfg.classifier, channels, cfg.dataset.image_size, num_classes)


def task(cfg, data: ImageData, device: torch.device) -> Task:
    """Noisy classifier p_phi(y | x_t, t) on q_sample(x_0, t) with t uniform (Dhariwal & Nichol 2021, Sec. 4.1), or,
    with classifier.noisy=false, the clean-image evaluator (t = 0 always). Evaluated on the held-out split: accuracy
    at the middle of each quarter of the noise range, or (evaluator) on clean images."""
    diffusion = Diffusion.from_config(cfg.diffusion).to(device)
    noisy, T = bool(cfg.classifier.noisy), diffusion.num_steps
    test = load_data(cfg, "test")

    def loss(net, x0, y):
        t = torch.randint(0, T, (len(y),), device=x0.device) if noisy else torch.zeros_like(y)
        logits = net(diffusion.q_sample(x0, t, torch.randn_like(x0)) if noisy else x0, t)
        correct = (logits.argmax(-1) == y).float()
        stats = {"acc": correct.mean()}
        if noisy:  # accuracy per quarter of the time range: 0 = least noise
            q = (t * 4) // T
            for i in range(4):  # no branching on tensor values: no host sync in the step (0/0 = nan if empty)
                stats[f"acc_q{i}"] = (correct * (q == i)).sum() / (q == i).sum()
        return F.cross_entropy(logits.float(), y), stats

    @torch.no_grad()
    def evaluate(ema_model, step: int, run_dir: Path) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(1234)  # the same noise at every evaluation
        metrics = {}
        for t_val in [int((i + 0.5) * T / 4) for i in range(4)] if noisy else [0]:
            correct = 0
            for start in range(0, len(test.labels), 500):
                x0, y = test.images[start:start + 500].to(device), test.labels[start:start + 500].to(device)
                t = torch.full((len(x0),), t_val, dtype=torch.long, device=device)
                x = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen).to(device)) if noisy else x0
                correct += (ema_model(x, t).argmax(-1) == y).sum().item()
            metrics[f"test_acc_t{t_val}" if noisy else "test_acc"] = correct / len(test.labels)
        return metrics

    return Task(network(cfg, data.info["channels"], data.num_classes), loss, evaluate)


def check(cfg) -> None:
    """The training options, and the classifier's own arguments (built on the meta device: no memory, no time)."""
    validate(cfg)
    spec = dataset_info(cfg.dataset.name)
    with torch.device("meta"):
        network(cfg, spec.channels, spec.num_classes)


if __name__ == "__main__":
    main(Path(__file__).parent / "configs", "train_classifier",
         lambda cfg, run_dir: train(cfg, "classifier", run_dir, task), protect="checkpoints", check=check)
