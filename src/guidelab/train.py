"""One training loop for both networks; each script (train_diffusion.py, train_classifier.py) gives it a Task: the
network, its loss and its evaluation. AdamW with linear warm-up (then constant or cosine), gradient clipping, EMA
weights with warm-up, bf16 autocast on CUDA, seeded RNGs, DDP, tqdm with loss and images/s, periodic evaluation,
atomic checkpoints every N steps and at the end, and `resume=true` with optimizer, EMA, step, data order and RNG state.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from guidelab import checkpoint, dist
from guidelab.attributes import check_defined, exclude, measured, parse_exclusion, statistics
from guidelab.conditions import ATTRIBUTES, rows
from guidelab.data import ImageData, dataset_shape, load_from_config
from guidelab.errors import GuidelabError
from guidelab.log import Logger, require_logger
from guidelab.pretrained import model_reference, sample_size
from guidelab.registry import OneOf, Range
from guidelab.schedules import schedule_signature


@dataclass
class Task:
    """What differs between the two trainings: the network, its loss and its periodic evaluation."""

    model: torch.nn.Module
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]  # (model, x0, y)
    evaluate: Callable[[torch.nn.Module, int, Path], dict]  # (ema model, step, run dir) -> metrics


class EMA:
    """Exponential moving average of the weights, decay min(decay, (1 + n) / (10 + n)) after n updates: the warm-up
    of TensorFlow's ExponentialMovingAverage, so short runs are not dominated by the random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        decay = min(self.decay, (1 + num_updates) / (10 + num_updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def conditioned_on(cfg) -> tuple[str, ...]:
    """The measured attributes the trained network takes or predicts (model.attributes, classifier.attributes)."""
    group = cfg.get("model") or cfg.get("classifier") or {}
    return tuple(group.get("attributes") or ())


def load_data(cfg, split: str) -> ImageData:
    """One split of the configured dataset, every key of its config passed on (a set's own keys included), with its
    measured attributes where the network is conditioned on them (`conditioned_on`)."""
    dataset = OmegaConf.to_container(cfg.dataset)
    data = load_from_config(dataset, split, seed=cfg.seed)
    if conditioned_on(cfg) or (cfg.get("exclude") and split == "train"):
        data.attributes = measured(data, dataset, split)
    if cfg.get("exclude") and split == "train":  # a compositional split: the same combination left out of every network
        keep, data.excluded = exclude(data, data.attributes, cfg.exclude)
        data.images, data.labels, data.attributes = data.images[keep], data.labels[keep], data.attributes[keep]
        print(f"exclude={cfg.exclude}: left out {data.excluded['removed']} images ({data.excluded})")
    if not conditioned_on(cfg):
        data.attributes = None
    return data


def conditions(data: ImageData) -> torch.Tensor:
    """What the network is trained on besides the image: the labels, or condition rows with the attributes."""
    if data.attributes is None:
        return data.labels
    return rows(data.labels, dict(zip(ATTRIBUTES, data.attributes.T)))


# ---------------------------------------------------------------- the loop
def lr_factor(step: int, cfg) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class StopRequest:
    """SIGTERM (pre-emption), SIGINT (Ctrl-C) and SIGUSR2 (SLURM's warning before the time limit, `--signal=USR2@S`,
    which submitit asks for) make the loop stop after the current step, save a checkpoint and exit; a second signal
    stops at once (KeyboardInterrupt). After the save, `hand_over` passes USR2 on to the handler that was there before
    (submitit's: it requeues the job, hydra_plugins.guidelab_cluster adding resume=auto)."""

    PREEMPT = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))  # submitit's own variable

    def __init__(self):
        self.name: str | None = None
        self.signum: int | None = None
        signals = (signal.SIGTERM, signal.SIGINT, self.PREEMPT)
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        if self.name is not None:
            raise KeyboardInterrupt
        self.name, self.signum = signal.Signals(signum).name, signum

    def hand_over(self) -> None:
        """Call the pre-emption signal's previous handler, if it is a function (a scheduler's, e.g. submitit's)."""
        previous = self.previous.get(self.signum) if self.signum == self.PREEMPT else None
        if callable(previous):
            previous(self.signum, None)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_output_dir(run_dir: Path, min_free_gb: float) -> None:
    """Fail in the first seconds, not at the first checkpoint: the run dir can be written (probed with a temporary
    file that is removed again) and the disk has at least `train.min_free_gb` free."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise GuidelabError(
            f"cannot write to the run dir {run_dir} ({e.strerror}); choose a writable hydra.run.dir"
        ) from None
    free_gb = shutil.disk_usage(run_dir).free / 1e9
    if free_gb < min_free_gb:
        raise GuidelabError(
            f"only {free_gb:.1f} GB free under {run_dir}, train.min_free_gb asks for {min_free_gb:g}; "
            "free some space, choose another hydra.run.dir, or lower train.min_free_gb"
        )


def finite(loss: torch.Tensor, step: int) -> float:
    """loss as a float; a non-finite loss stops the run (before anything is saved for that step)."""
    value = loss.item()
    if not math.isfinite(value):
        raise GuidelabError(
            f"loss is {value} at step {step}; nothing was saved for it. Lower train.lr or raise "
            "train.warmup_steps, then resume from the last good checkpoint (resume=true)"
        )
    return value


def validate(cfg) -> None:
    """Range checks of the training options (Hydra has checked their types), before anything is loaded or written."""
    tc = cfg.train
    for key in ("steps", "batch_size", "log_every", "keep_checkpoints"):
        Range(1).check(f"train.{key}", tc[key], tc)
    for key in ("warmup_steps", "eval_every", "ckpt_every", "weight_decay", "min_free_gb"):
        Range(0).check(f"train.{key}", tc[key], tc)
    Range(0, why="e.g. train.lr=2e-4", open_lo=True).check("train.lr", tc.lr, tc)
    Range(0, open_lo=True).check("train.grad_clip", tc.grad_clip, tc)
    Range(0, 1 - 1e-12, "e.g. train.ema_decay=0.9999").check("train.ema_decay", tc.ema_decay, tc)
    OneOf(("constant", "cosine")).check("train.lr_schedule", tc.lr_schedule, tc)
    if cfg.get("exclude"):
        check_defined(cfg.dataset, f"exclude={cfg.exclude}")
        parse_exclusion(cfg.exclude, dataset_shape(cfg.dataset)[1])
    if "diffusion" in cfg and cfg.diffusion.schedule == "pretrained":  # found and read now, its image size matched
        reference = model_reference(cfg.diffusion)
        schedule_signature(cfg.diffusion)
        if (size := sample_size(reference)) != cfg.dataset.image_size:
            raise GuidelabError(
                f"{reference} samples {size}x{size} images but dataset.image_size is {cfg.dataset.image_size}; train "
                f"on the model's size: dataset.image_size={size}"
            )


@dataclass
class _Run:
    """One training run's state from step to step (the networks, the optimizer and the data order) and what it does
    besides stepping: checkpoints and evaluations."""

    kind: str  # "diffusion" or "classifier", as the checkpoint records
    cfg: Any
    run_dir: Path
    task: Task
    config: dict  # the resolved config the checkpoints embed
    device: torch.device
    model: torch.nn.Module  # the network itself (what checkpoints, EMA and the optimizer see)
    net: torch.nn.Module  # what the step calls: the model, DDP-wrapped and/or compiled
    ema: EMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    data_gen: torch.Generator  # the data order, on the CPU whatever the device
    perm: torch.Tensor
    cursor: int = 0
    step: int = 0
    logger: Logger | None = None

    @property
    def modules(self) -> dict:
        """Checkpointed under these names."""
        return {"model": self.model, "ema": self.ema.model, "optimizer": self.opt, "scheduler": self.sched}

    def save(self, final_metrics: dict | None = None) -> None:
        rngs = dist.gather(checkpoint.rng_state(self.device))  # every rank's own RNG state, on rank 0
        if dist.is_main():
            if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
                raise GuidelabError(
                    f"the weights hold inf/nan at step {self.step}; nothing was saved for it. Lower "
                    "train.lr or raise train.warmup_steps, then resume from the last good checkpoint "
                    "(resume=true)"
                )
            order = {"perm": self.perm, "cursor": self.cursor}
            state = checkpoint.state(
                self.kind, self.modules, self.step, order, rngs, self.data_gen, self.config, final_metrics
            )
            checkpoint.save(state, self.run_dir / "checkpoints", self.cfg.train.keep_checkpoints)
        dist.barrier()

    def evaluate(self) -> dict:
        metrics = self.task.evaluate(self.ema.model, self.step, self.run_dir) if dist.is_main() else {}
        if (image := metrics.pop("_image", None)) is not None:
            self.logger.log_image("samples", image, self.step)
        if metrics:
            self.logger.log({f"eval/{k}": v for k, v in metrics.items()}, self.step)
            tqdm.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        dist.barrier()
        return metrics

    def next_indices(self, num_labels: int) -> torch.Tensor:
        """This rank's share of the next global batch; a new epoch draws a fresh permutation."""
        batch = self.cfg.train.batch_size
        if self.cursor + batch > len(self.perm):
            self.perm, self.cursor = torch.randperm(num_labels, generator=self.data_gen).to(self.device), 0
        idx = self.perm[self.cursor : self.cursor + batch][dist.rank() :: dist.world_size()]
        self.cursor += batch
        return idx


def _start(cfg, run_dir: Path, kind: str):
    """The checkpoint to resume from (None: a fresh run), after refusing to overwrite another run's checkpoints.
    resume=auto resumes when the dir holds a checkpoint (of the same config: `checkpoint.restore` refuses another) and
    starts fresh when it holds none, so a requeued job passes the same command every time."""
    if cfg.resume is False:
        checkpoint.refuse_overwrite(run_dir)
        return None
    found = checkpoint.newest_intact(run_dir / "checkpoints", kind)
    if found is None:
        print(
            f"resume={str(cfg.resume).lower()} but {run_dir / 'checkpoints'} holds no checkpoint: starting from step 0"
        )
    return found


def _build(cfg, kind: str, run_dir: Path, task: Task, config: dict, device: torch.device, num_labels: int) -> _Run:
    """The run's networks (DDP, compile), EMA, AdamW and its learning-rate schedule, and the first data order."""
    tc, world = cfg.train, dist.world_size()
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = task.model.to(device, memory_format=memory_format)
    ddp_ids = [device] if device.type == "cuda" else None
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_ids)
    if tc.compile:  # the wrapper shares model's parameters: checkpoints, EMA and the optimizer see `model` as before
        net = torch.compile(net, backend=tc.compile_backend)
    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999), fused=device.type == "cuda"
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))
    data_gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(num_labels, generator=data_gen).to(device)
    return _Run(kind, cfg, run_dir, task, config, device, model, net, ema, opt, sched, data_gen, perm)


def _log_step(run: _Run, bar, loss: torch.Tensor, stats: dict, grad_norm: torch.Tensor, rate: float) -> None:
    loss_val = finite(dist.mean(loss), run.step)  # host syncs only at log intervals and checkpoints
    bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{rate:.0f}")
    scalars = {"train/loss": loss_val, "train/grad_norm": grad_norm.item(), "train/lr": run.sched.get_last_lr()[0]}
    run.logger.log({**scalars, "train/img_per_s": rate, **{f"train/{k}": v.item() for k, v in stats.items()}}, run.step)


def _stopped(run, stop: StopRequest, loss: torch.Tensor, run_dir: Path) -> None:
    """A signal asked the loop to stop: save this step, hand the signal on (under submitit the job is requeued and
    this process exits there), else end the run with the line that continues it."""
    finite(dist.mean(loss), run.step)
    run.save()
    stop.hand_over()
    raise GuidelabError(
        f"stopped by {stop.name or 'a signal on another rank'} at step {run.step}; saved "
        f"{run_dir / 'checkpoints' / 'last.pt'}; continue with the same command plus "
        f"resume=true hydra.run.dir={run_dir}"
    )


def _step(run: _Run, task: Task, x0: torch.Tensor, y: torch.Tensor, autocast) -> tuple:
    """One optimizer step on the batch (x0, y): (loss, the task's stats, the gradient norm before clipping)."""
    with autocast:
        loss, stats = task.loss(run.net, x0, y)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip)
    run.opt.step()
    run.sched.step()
    run.step += 1
    run.ema.update(run.model, run.step)
    return loss, stats, grad_norm


def _setup(cfg) -> torch.device:
    """The run's device and process group; the global batch checked against the ranks."""
    device, world = dist.setup(dist.select_device(cfg.device)), dist.world_size()
    if cfg.train.batch_size % world:
        raise GuidelabError(
            f"train.batch_size {cfg.train.batch_size} is the global batch and must divide evenly over the "
            f"{world} ranks; pick a multiple of {world}"
        )
    return device


def train(cfg, kind: str, run_dir: str | os.PathLike, make_task: Callable[..., Task]) -> dict:
    """Train what `make_task(cfg, data, device)` describes (kind "diffusion" or "classifier", as the checkpoint records)
    as `cfg` says."""
    run_dir = Path(run_dir)
    validate(cfg)
    tc = cfg.train
    device = _setup(cfg)
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    found = _start(cfg, run_dir, kind)
    require_logger(cfg.logger)
    check_output_dir(run_dir, tc.min_free_gb)
    torch.manual_seed(cfg.seed + rank)  # ranks draw different noise; DDP broadcasts rank 0's initial weights
    data = load_data(cfg, "train")
    task = make_task(cfg, data, device)
    info = (
        data.info if data.attributes is None else {**data.info, "attributes": statistics(data.attributes, ATTRIBUTES)}
    )
    config = {**OmegaConf.to_container(cfg, resolve=True), "data_info": info}
    if "diffusion" in cfg:  # the schedule in diffusers' terms: a pretrained model's is read once, here
        config["schedule"] = schedule_signature(cfg.diffusion)
    images, labels = data.images.to(device), conditions(data).to(device)  # small data sets live on the device
    run = _build(cfg, kind, run_dir, task, config, device, len(labels))
    if found is not None:
        run.step, order = checkpoint.restore(*found, config, run.modules, run.data_gen, device, cfg.seed)
        run.perm, run.cursor = order["perm"].to(device), order["cursor"]
    run.logger = Logger(run_dir, cfg.logger, config, enabled=main)  # rank 0 alone logs and writes
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.bf16)
    stop = StopRequest()
    try:
        run.model.train()
        bar = tqdm(total=tc.steps, initial=run.step, desc=f"train {kind}", dynamic_ncols=True,
                   disable=not (tc.progress and main))  # fmt: skip
        t_log, seen = time.perf_counter(), 0
        while run.step < tc.steps:
            idx = run.next_indices(len(labels))
            x0, y = images[idx].contiguous(memory_format=memory_format), labels[idx]
            if data.hflip:
                flip = torch.rand(len(y), device=device) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            loss, stats, grad_norm = _step(run, task, x0, y, autocast)
            seen += len(y) * world
            bar.update(1)
            if run.step % tc.log_every == 0 or run.step == tc.steps:
                _log_step(run, bar, loss, stats, grad_norm, seen / (time.perf_counter() - t_log))
                t_log, seen = time.perf_counter(), 0
            if tc.eval_every and run.step % tc.eval_every == 0 and run.step < tc.steps:
                run.evaluate()
            if tc.ckpt_every and run.step % tc.ckpt_every == 0 and run.step < tc.steps:
                finite(dist.mean(loss), run.step)  # never write a poisoned checkpoint
                run.save()
            # one process checks its flag every step; DDP ranks agree at log intervals (a collective, not every step)
            if (world == 1 or run.step % tc.log_every == 0) and dist.any_rank(stop.name is not None, device):
                _stopped(run, stop, loss, run_dir)
    finally:
        stop.restore()
    bar.close()
    return _finish(run, run_dir)


def _finish(run: _Run, run_dir: Path) -> dict:
    """The final evaluation and checkpoint; the logger and the process group closed."""
    final = run.evaluate()
    run.save(final)
    run.logger.close()
    dist.cleanup()
    if dist.is_main():
        print(f"done: {run_dir / 'checkpoints' / 'last.pt'} (step {run.step})")
    return final
