"""What train_classifier.py adds to the loop for the evaluators: PGD examples (Madry et al. 2018)."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

_spec = importlib.util.spec_from_file_location("train_classifier", Path(__file__).parents[1] / "train_classifier.py")
train_classifier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_classifier)


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 3)

    def forward(self, x, t):
        return self.lin(x.flatten(1))


def test_pgd_stays_in_the_ball_and_the_data_range_and_raises_the_loss():
    torch.manual_seed(0)
    net, x, y = Linear(), torch.rand(32, 1, 4, 4) * 2 - 1, torch.randint(0, 3, (32,))
    t = torch.zeros(32, dtype=torch.long)
    x_adv = train_classifier.pgd(net, x, y, t, eps=0.1, steps=3)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= -1 and x_adv.max() <= 1
    assert not x_adv.requires_grad and all(p.grad is None for p in net.parameters())  # no parameter gradients
    loss = lambda inputs: F.cross_entropy(net(inputs, t), y).item()
    assert loss(x_adv) > loss(x) + 0.05
    noise = (x + 0.1 * torch.randn_like(x).sign()).clamp(-1, 1)  # a random corner of the ball hurts less
    assert loss(x_adv) > loss(noise)
