"""Sample metrics under an independent evaluator (never the guidance classifier, which guidance optimises)."""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def class_accuracy(evaluator, images: np.ndarray, labels: np.ndarray, num_classes: int, device: torch.device,
                   batch_size: int = 500) -> dict:
    """How often the evaluator's label equals the requested one: overall and per class.

    images: uint8 (N, H, W, C) as in samples.npz; labels: the requested classes."""
    preds = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        t = torch.zeros(len(x), dtype=torch.long, device=device)
        preds.append(evaluator(x, t).argmax(-1).cpu())
    correct = (torch.cat(preds).numpy() == labels)
    per_class = {str(c): float(correct[labels == c].mean()) for c in range(num_classes) if (labels == c).any()}
    return {"accuracy": float(correct.mean()), "accuracy_per_class": per_class}
