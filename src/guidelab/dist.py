"""torchrun + DDP: one process per device, started as `torchrun --nproc_per_node=N SCRIPT.py ...`, as the tasks of a
SLURM job step (`srun`, which submitit's SLURM executor runs), or as the tasks of submitit's local executor.

Plain `python SCRIPT.py` is a world of one and none of this does anything. Under torchrun (WORLD_SIZE > 1) the
process group is NCCL on CUDA and gloo on the CPU, with a bounded timeout so a rank that dies cannot leave the
others waiting forever (torchrun itself also ends the whole job when one rank exits with an error). A scheduler's
tasks get torchrun's variables from the scheduler's own (`adopt_scheduler_env`), so the rest reads one set.
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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[007-009,12],cpu1" -> "gpu007" (zero padding kept)."""
    group = nodelist.split(",", 1)[0]
    if "[" not in group:
        return group
    prefix, ranges = group.split("[", 1)  # the first range of the first group: "007-009" of gpu[007-009,12]
    return prefix + ranges.split("-")[0].rstrip("]")


def _port(job_id: str) -> str:
    """A port every task of a job derives alike from the job's id (no task can tell the others which port it took)."""
    return str(20000 + int(job_id) % 20000) if job_id.isdigit() else "29500"


def scheduler_env(environ=os.environ) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for a process
    that a scheduler started as one task of several; {} under torchrun (WORLD_SIZE is set) or alone.

    - a SLURM job step (`srun`, and submitit's SLURM executor): SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
      the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) as the master; a batch script's own shell is not
      a step (no SLURM_STEP_NUM_TASKS) and runs alone;
    - submitit's local executor: SUBMITIT_LOCAL_GLOBALID, _NTASKS and _LOCALID on 127.0.0.1.
    MASTER_PORT is kept when set, else derived from the job id (the same in every task of the job)."""
    if "WORLD_SIZE" in environ:
        return {}
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        world, rank_, local = environ["SLURM_STEP_NUM_TASKS"], environ["SLURM_PROCID"], environ.get("SLURM_LOCALID")
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", world).split("(")[0].split(",")[0]
        master, job = first_host(nodes), environ.get("SLURM_JOB_ID", "")
    elif environ.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in environ:
        world, rank_ = environ["SUBMITIT_LOCAL_NTASKS"], environ["SUBMITIT_LOCAL_GLOBALID"]
        local, per_node, master = environ["SUBMITIT_LOCAL_LOCALID"], world, "127.0.0.1"
        job = environ.get("SUBMITIT_LOCAL_JOB_ID", "")
    else:
        return {}
    master = {"MASTER_ADDR": environ.get("MASTER_ADDR", master), "MASTER_PORT": environ.get("MASTER_PORT", _port(job))}
    return {"RANK": rank_, "WORLD_SIZE": world, "LOCAL_RANK": local or "0", "LOCAL_WORLD_SIZE": per_node} | master


def adopt_scheduler_env() -> None:
    """Export `scheduler_env()` into this process's environment (once; torchrun's own variables are never replaced)."""
    os.environ.update(scheduler_env())


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
