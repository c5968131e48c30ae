"""guided.measured_flops counts what FlopCounterMode's total counts, on guidelab's own networks: a plain UNet pass and
a classifier-guided step (the classifier's input gradient w.r.t. x_t, a leaf), without writing anything of
FlopCounterMode's."""

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from conftest import CONFIGS, eps_function
from guidelab.diffusion import Diffusion, linear_betas
from guidelab.guided import measured_flops
from guidelab.models import build_classifier, build_unet


def flop_counter_total(fn, *args) -> int:
    """The reference: FlopCounterMode's total with its module tracker replaced by one that puts every count under
    "Global" (how measured_flops counted before; the tracker's backward hooks refuse autograd.grad on a leaf)."""

    class Global:
        parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return None

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = Global()
    with counter:
        fn(*args)
    return counter.get_total_flops()


def _network(group: str, name: str, build):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{name}.yaml"))
    cfg.pop("defaults", None)
    torch.manual_seed(0)
    return build(cfg, 1, 16, 10).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def nets():
    return _network("model", "unet_tiny", build_unet), _network("classifier", "noisy_tiny", build_classifier)


def test_a_plain_unet_pass_counts_what_flop_counter_mode_counts(nets):
    unet, _ = nets
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([10, 400, 900]), torch.tensor([1, 2, 10])
    expected = flop_counter_total(unet, x, t, y)
    assert expected > 0 and measured_flops(unet, x, t, y) == expected


def test_a_classifier_guided_step_counts_what_flop_counter_mode_counts(nets):
    """guidance=cg: the UNet's pass, the classifier's forward pass and its input gradient (a backward pass through the
    classifier to x_t) are all counted."""
    unet, classifier = nets
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([10, 400, 900]), torch.tensor([1, 2, 3])
    process = Diffusion(linear_betas(1000))
    eps_fn = eps_function("cg", unet, y, 3.0, classifier=classifier, diffusion=process)
    with pytest.raises(RuntimeError, match="leaf node"):  # why FlopCounterMode itself cannot count the step
        with FlopCounterMode(display=False):
            eps_fn(x, t)
    expected = flop_counter_total(eps_fn, x, t)
    assert expected > measured_flops(unet, x, t, y) + flop_counter_total(classifier, x, t)  # the backward counted
    assert measured_flops(eps_fn, x, t) == expected
