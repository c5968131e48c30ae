"""The eps-function protocol between guidance and sampling, below both: a guidance mode builds an `EpsFn`, a sampler
calls it and applies the `Guided` it returns (the k-diffusion pattern: samplers are pure functions of the model).

Also the helpers both sides share: the noise level of a timestep, `Counted`, the wrapper that counts a network's
evaluations (and times the guidance gradients), and `measured_flops`, so that the cost of a run is measured, never
predicted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class Guided(NamedTuple):
    """What an eps-function returns for x_t at the model's timestep t."""

    eps: torch.Tensor  # the (guided) noise prediction; with x0 given, the direction the sampler re-noises along
    score: torch.Tensor | None = None  # s * grad_x log p(y | x_t) (cg_x0: of log p(y | x0_hat(x_t))), applied by the
    # sampler in its own form (DDPM: mean shift, Dhariwal & Nichol 2021 Alg. 1; others: eps correction, Alg. 2)
    x0: torch.Tensor | None = None  # data prediction replacing the one implied by eps (CFG++); None = from eps
    x0_shift: torch.Tensor | None = None  # a displacement of the data prediction, added after clipping and after the
    # score in every sampler (universal guidance's backward step, Bansal et al. 2023, Sec. 3.2)


EpsFn = Callable[[torch.Tensor, torch.Tensor], Guided]


def noise_level(abar_t: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar_t) / abar_t): the noise-to-signal ratio, the EDM sigma of x_t / sqrt(abar_t)
    (Karras et al. 2022, Sec. 2), in which Kynkaanniemi et al. 2024 state their guidance interval."""
    return ((1 - abar_t) / abar_t).sqrt()


class Tally:
    """What a network cost so far: the rows (samples) it was evaluated on, and the wall seconds spent inside `timed()`
    blocks (the guidance gradients)."""

    def __init__(self):
        self.rows, self.seconds = 0, 0.0


class Counted:
    """A network that counts its evaluations in a `Tally`; attributes pass through to the network. `around(other)`
    counts another network (e.g. a smoothed copy of this one) into the same tally."""

    def __init__(self, net, tally: Tally | None = None):
        self.net, self.tally = net, tally or Tally()

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        self.tally.rows += len(x)
        return self.net(x, *args, **kwargs)

    def around(self, net) -> Counted:
        return Counted(net, self.tally)

    @property
    def rows(self) -> int:
        return self.tally.rows

    @property
    def seconds(self) -> float:
        return self.tally.seconds

    def __getattr__(self, name):
        return getattr(self.net, name)


@contextmanager
def timed(net, device: torch.device):
    """Add the block's wall time to `net.seconds` when the network is `Counted` (others: nothing is timed). On CUDA the
    block is bracketed by synchronisations, so that the time is the block's own and not the queue's."""
    if not isinstance(net, Counted):
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        net.tally.seconds += time.perf_counter() - start


def measured_flops(fn: Callable, *args, **kwargs) -> int:
    """The floating-point operations of `fn(*args, **kwargs)` as torch.utils.flop_counter counts them: every matmul,
    convolution and attention of the forward passes and of the backward passes taken inside (a classifier's input
    gradient, cg_x0's pass back through the UNet), so that a guided step's cost counts what each method really runs.
    The total of FlopCounterMode, by `FlopCount` (FlopCounterMode itself cannot count these runs: see there)."""
    with FlopCount() as count:
        fn(*args, **kwargs)
    return count.total


class FlopCount(TorchDispatchMode):
    """FlopCounterMode's total, without its per-module breakdown: a dispatch mode that adds torch.utils.flop_counter's
    formula (`flop_registry`) of every operator that runs inside it, forward and backward, after offering each
    operator its decomposition first, as FlopCounterMode does. FlopCounterMode always tracks modules, and its module
    tracker hooks every module's inputs for the backward pass, which torch.autograd.grad on a leaf input (the guidance
    gradients w.r.t. x_t) refuses ("A leaf node was passed to _will_engine_execute_node"); only the total is wanted.
    TorchDispatchMode is torch's extension point for modes (torch.utils._python_dispatch, the base class of
    FlopCounterMode's own mode)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.prim.device.default:  # an operator the registry has no formula for may decompose
            with self:  # into operators it has: its parts are counted (FlopCounterMode's rule)
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out
