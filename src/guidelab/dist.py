"""torchrun + DDP: one process per device, started as `torchrun --nproc_per_node=N SCRIPT.py ...`.

Plain `python SCRIPT.py` is a world of one and none of this does anything. Under torchrun (WORLD_SIZE > 1) the
process group is NCCL on CUDA and gloo on the CPU, with a bounded timeout so a rank that dies cannot leave the
others waiting forever (torchrun itself also ends the whole job when one rank exits with an error).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from guidelab.errors import GuidelabError


def select_device(name: str) -> torch.device:
    """`device=auto|cpu|cuda` as a torch.device (auto: CUDA when visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GuidelabError("device=cuda was asked for but no CUDA device is visible; use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise GuidelabError(f"unknown device {name!r}; use device=auto, device=cpu or device=cuda")
    return torch.device(name)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device, timeout_s: float = 600) -> torch.device:
    """Join the torchrun process group (if any) and return this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (itself in a world of one)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] in a world of one."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (itself in a world of one)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
