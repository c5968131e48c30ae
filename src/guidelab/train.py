"""One training loop for both networks: the diffusion UNet (eps loss) and the classifiers (cross-entropy).

AdamW with linear warm-up (then constant or cosine), gradient clipping, EMA weights with warm-up, bf16 autocast on
CUDA, seeded RNGs, tqdm with loss and images/s, periodic evaluation (sample grids / accuracy), atomic checkpoints
every N steps and at the end, and `resume=true` from `checkpoints/last.pt` with optimizer, EMA, step, data order
and RNG state.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from guidelab import checkpoint, dist
from guidelab.data import ImageData, load_dataset
from guidelab.diffusion import Diffusion
from guidelab.errors import GuidelabError
from guidelab.log import Logger
from guidelab.models import build_classifier, build_unet


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GuidelabError("device=cuda was asked for but no CUDA device is visible; use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise GuidelabError(f"unknown device {name!r}; use device=auto, device=cpu or device=cuda")
    return torch.device(name)


@dataclass
class Task:
    """What differs between the two trainings: the network, its loss and its periodic evaluation."""

    kind: str  # "diffusion" or "classifier": stored in the checkpoint
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
        ema_p, p = list(self.model.parameters()), list(model.parameters())
        torch._foreach_lerp_(ema_p, p, 1 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def data_info(data: ImageData) -> dict:
    return {"num_classes": data.num_classes, "channels": int(data.images.shape[1]), "class_names": list(data.class_names)}


def load_data(cfg, split: str) -> ImageData:
    d = cfg.dataset
    return load_dataset(d.name, split=split, root=d.root, image_size=d.image_size, download=d.download, seed=cfg.seed)


# ---------------------------------------------------------------- tasks
def diffusion_task(cfg, data: ImageData, device: torch.device) -> Task:
    """eps_theta(x_t, t, y) trained with L_simple (Ho et al. 2020) and label dropout (Ho & Salimans 2022, Alg. 1)."""
    info = data_info(data)
    model = build_unet(cfg.model, info["channels"], cfg.dataset.image_size, info["num_classes"])
    diffusion = Diffusion.from_config(cfg.diffusion).to(device)

    def loss(net, x0, y):
        return diffusion.eps_loss(net, x0, y), {}

    def evaluate(ema_model, step, run_dir):
        from guidelab.generate import sample_grid  # the sampler stack, only needed for periodic grids

        path = run_dir / "samples" / f"{step:07d}.png"
        sample_grid(ema_model, diffusion, info["num_classes"], path, scale=cfg.train.eval_scale,
                    steps=cfg.train.eval_steps, device=device, seed=cfg.seed)
        return {"_image": path}

    return Task("diffusion", model, loss, evaluate)


def classifier_task(cfg, data: ImageData, device: torch.device) -> Task:
    """Noisy classifier p_phi(y | x_t, t) on q_sample(x_0, t) with t uniform (Dhariwal & Nichol 2021, Sec. 4.1), or,
    with classifier.noisy=false, the clean-image evaluator (t = 0 always)."""
    info = data_info(data)
    model = build_classifier(cfg.classifier, info["channels"], cfg.dataset.image_size, info["num_classes"])
    diffusion = Diffusion.from_config(cfg.diffusion).to(device)
    noisy = bool(cfg.classifier.noisy)
    T = diffusion.num_steps
    test = load_data(cfg, "test")

    def noised(x0, t):
        return diffusion.q_sample(x0, t, torch.randn_like(x0)) if noisy else x0

    def loss(net, x0, y):
        t = torch.randint(0, T, (len(y),), device=x0.device) if noisy else torch.zeros_like(y)
        logits = net(noised(x0, t), t)
        correct = (logits.argmax(-1) == y).float()
        stats = {"acc": correct.mean()}
        if noisy:  # accuracy per quarter of the time range: 0 = least noise
            q = (t * 4) // T
            for i in range(4):  # no branching on tensor values: no host sync in the step (0/0 = nan if empty)
                stats[f"acc_q{i}"] = (correct * (q == i)).sum() / (q == i).sum()
        return F.cross_entropy(logits.float(), y), stats

    @torch.no_grad()
    def evaluate(ema_model, step, run_dir):
        gen = torch.Generator(device="cpu").manual_seed(1234)  # the same noise at every evaluation
        ts = [0] if not noisy else [int((i + 0.5) * T / 4) for i in range(4)]
        metrics = {}
        for i, t_val in enumerate(ts):
            correct = 0
            for start in range(0, len(test.labels), 500):
                x0 = test.images[start:start + 500].to(device)
                y = test.labels[start:start + 500].to(device)
                t = torch.full((len(x0),), t_val, dtype=torch.long, device=device)
                x = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen).to(device)) if noisy else x0
                correct += (ema_model(x, t).argmax(-1) == y).sum().item()
            metrics["test_acc" if not noisy else f"test_acc_t{t_val}"] = correct / len(test.labels)
        return metrics

    return Task("classifier", model, loss, evaluate)


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
    """SIGTERM (pre-emption) and SIGINT (Ctrl-C) ask the loop to stop after the current step, save a checkpoint and
    exit; a second signal stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

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
        raise GuidelabError(f"cannot write to the run dir {run_dir} ({e.strerror}); choose a writable "
                            "hydra.run.dir") from None
    free_gb = shutil.disk_usage(run_dir).free / 1e9
    if free_gb < min_free_gb:
        raise GuidelabError(f"only {free_gb:.1f} GB free under {run_dir}, train.min_free_gb asks for {min_free_gb:g}; "
                            "free some space, choose another hydra.run.dir, or lower train.min_free_gb")


def finite(loss: torch.Tensor, step: int) -> float:
    """loss as a float; a non-finite loss stops the run (before anything is saved for that step)."""
    value = loss.item()
    if not math.isfinite(value):
        raise GuidelabError(f"loss is {value} at step {step}; nothing was saved for it. Lower train.lr or raise "
                            "train.warmup_steps, then resume from the last good checkpoint (resume=true)")
    return value


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Return last.pt to resume from, or None to start fresh; never train over another run's checkpoints."""
    last = run_dir / "checkpoints" / "last.pt"
    if resume:
        if last.exists():
            return last
        print(f"resume=true but {last} does not exist: starting from step 0")
        return None
    refuse_overwrite(run_dir)
    return None


def refuse_overwrite(run_dir: Path) -> None:
    """A fresh run never writes into a run dir that holds another run's checkpoints."""
    if any((run_dir / "checkpoints").glob("*.pt")):
        raise GuidelabError(f"{run_dir} already holds checkpoints of a run; pass resume=true to continue it, "
                            "or choose another hydra.run.dir")


def validate(cfg, kind: str) -> None:
    """Range checks of the training options, before anything is loaded or written."""
    tc = cfg.train

    def check(key: str, value, ok: bool, want: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
            raise GuidelabError(f"{key} must be {want}, got {value!r}")

    for key in ("steps", "batch_size", "log_every", "keep_checkpoints"):
        check(f"train.{key}", tc[key], isinstance(tc[key], int) and tc[key] >= 1, "a positive integer")
    for key in ("warmup_steps", "eval_every", "ckpt_every"):
        check(f"train.{key}", tc[key], isinstance(tc[key], int) and tc[key] >= 0, "an integer >= 0")
    check("train.lr", tc.lr, tc.lr > 0, "a positive number, e.g. train.lr=2e-4")
    check("train.weight_decay", tc.weight_decay, tc.weight_decay >= 0, "a number >= 0")
    check("train.grad_clip", tc.grad_clip, tc.grad_clip > 0, "a positive number")
    check("train.min_free_gb", tc.min_free_gb, tc.min_free_gb >= 0, "a number >= 0 (GB)")
    check("train.ema_decay", tc.ema_decay, 0 <= tc.ema_decay < 1, "in [0, 1), e.g. train.ema_decay=0.9999")
    for key in ("compile", "channels_last", "bf16"):
        if not isinstance(tc[key], bool):
            raise GuidelabError(f"train.{key} must be true or false, got {tc[key]!r}")
    if tc.lr_schedule not in ("constant", "cosine"):
        raise GuidelabError(f"unknown train.lr_schedule {tc.lr_schedule!r}; use constant or cosine")
    if kind == "diffusion":
        p = cfg.model.p_uncond
        check("model.p_uncond", p, 0 <= p <= 1, "in [0, 1] (the label-dropout rate; 0.1 in Ho & Salimans 2022)")


def train(cfg, kind: str, run_dir: str | os.PathLike) -> dict:
    """Train the diffusion UNet (kind="diffusion") or a classifier (kind="classifier") as `cfg` says."""
    run_dir = Path(run_dir)
    validate(cfg, kind)
    tc = cfg.train
    device = dist.setup(select_device(cfg.device))
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    if tc.batch_size % world:
        raise GuidelabError(f"train.batch_size {tc.batch_size} is the global batch and must divide evenly over the "
                            f"{world} ranks; pick a multiple of {world}")
    resume_from = check_run_dir(run_dir, cfg.resume)
    check_output_dir(run_dir, tc.min_free_gb)
    torch.manual_seed(cfg.seed + rank)  # ranks draw different noise; DDP broadcasts rank 0's initial weights
    data = load_data(cfg, "train")
    task = (diffusion_task if kind == "diffusion" else classifier_task)(cfg, data, device)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data_info"] = data_info(data)

    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = task.model.to(device, memory_format=memory_format)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    if tc.compile:  # the wrapper shares model's parameters: checkpoints, EMA and the optimizer see `model` as before
        net = torch.compile(net, backend=tc.compile_backend)
    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))
    images, labels = data.images.to(device), data.labels.to(device)  # small data sets live on the device
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the data order, on the CPU whatever the device
    perm, cursor, step = torch.randperm(len(labels), generator=data_gen).to(device), 0, 0

    if resume_from is not None:
        ckpt = checkpoint.load(resume_from, kind=kind)
        before = ckpt["config"]
        mismatch = [sec for sec in ("model", "classifier", "diffusion") if sec in config and before.get(sec) != config[sec]]
        if any(before["dataset"][k] != config["dataset"][k] for k in ("name", "image_size")):  # the root may move
            mismatch.append("dataset")
        if mismatch:
            raise GuidelabError(f"resume=true but the {', '.join(mismatch)} config differs from the checkpoint in "
                                f"{resume_from}; resume with the same settings or use a new hydra.run.dir")
        model.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, perm, cursor = ckpt["step"], ckpt["data"]["perm"].to(device), ckpt["data"]["cursor"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        print(f"resumed from {resume_from} at step {step}")

    logger = Logger(run_dir, cfg.logger, config, enabled=main)  # rank 0 alone logs and writes

    def save(final_metrics: dict | None = None) -> None:
        if not main:
            return dist.barrier()
        if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
            raise GuidelabError(f"the weights hold inf/nan at step {step}; nothing was saved for it. Lower train.lr or "
                                "raise train.warmup_steps, then resume from the last good checkpoint (resume=true)")
        state = {"kind": kind, "model": model.state_dict(), "ema": ema.model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                 "data": {"perm": perm, "cursor": cursor},
                 "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                         "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
                 "config": config, "metrics": final_metrics or {}}
        ckpt_dir = run_dir / "checkpoints"
        path = ckpt_dir / f"{step:07d}.pt"
        checkpoint.save_atomic(state, path)
        tmp = ckpt_dir / ".last.pt.link"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)  # last.pt is a second name of the newest checkpoint, swapped in atomically
        os.replace(tmp, ckpt_dir / "last.pt")
        for old in sorted(ckpt_dir.glob("[0-9]" * 7 + ".pt"))[:-tc.keep_checkpoints]:
            old.unlink()
        dist.barrier()

    def run_eval() -> dict:
        if not main:
            dist.barrier()
            return {}
        metrics = task.evaluate(ema.model, step, run_dir)
        image = metrics.pop("_image", None)
        if image is not None:
            logger.log_image("samples", image, step)
        if metrics:
            logger.log({f"eval/{k}": v for k, v in metrics.items()}, step)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        dist.barrier()
        return metrics

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.bf16)
    stop = StopRequest()
    try:
        model.train()
        bar = tqdm(total=tc.steps, initial=step, desc=f"train {kind}", dynamic_ncols=True,
                   disable=not (tc.progress and main))
        t_log, seen = time.perf_counter(), 0
        while step < tc.steps:
            if cursor + tc.batch_size > len(perm):  # a new epoch: a fresh permutation
                perm, cursor = torch.randperm(len(labels), generator=data_gen).to(device), 0
            idx = perm[cursor:cursor + tc.batch_size][rank::world]  # this rank's share of the global batch
            cursor += tc.batch_size
            x0, y = images[idx].contiguous(memory_format=memory_format), labels[idx]
            if data.hflip:
                flip = torch.rand(len(y), device=device) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            with autocast:
                loss, stats = task.loss(net, x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            step += 1
            ema.update(model, step)
            seen += len(y) * world
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                loss_val = finite(dist.mean(loss), step)  # host syncs only at log intervals and checkpoints
                rate = seen / (time.perf_counter() - t_log)
                t_log, seen = time.perf_counter(), 0
                bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{rate:.0f}")
                logger.log({"train/loss": loss_val, "train/grad_norm": grad_norm.item(),
                            "train/lr": sched.get_last_lr()[0], "train/img_per_s": rate,
                            **{f"train/{k}": v.item() for k, v in stats.items()}}, step)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                run_eval()
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < tc.steps:
                finite(dist.mean(loss), step)  # never write a poisoned checkpoint
                save()
            # one process checks its flag every step; DDP ranks agree at log intervals (a collective, not every step)
            if (world == 1 or step % tc.log_every == 0) and dist.any_rank(stop.name is not None, device):
                finite(dist.mean(loss), step)
                save()
                raise GuidelabError(f"stopped by {stop.name or 'a signal on another rank'} at step {step}; saved "
                                    f"{run_dir / 'checkpoints' / 'last.pt'}; continue with the same command plus "
                                    f"resume=true hydra.run.dir={run_dir}")
    finally:
        stop.restore()
    bar.close()
    final = run_eval()
    save(final)
    logger.close()
    dist.cleanup()
    if main:
        print(f"done: {run_dir / 'checkpoints' / 'last.pt'} (step {step})")
    return final
