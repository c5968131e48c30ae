"""Drawing a sampling run's samples: its value checks, the batch loop and the FLOPs of one sample.

Batch b draws its noise from seed * 1000003 + b and runs on DDP rank b % world, so the samples do not depend on the
number of ranks. Each finished batch is written to RUN/shards/ at once: after a kill, the same command with
resume=true draws only the missing batches (guidelab.shards), and rank 0 gathers every rank's batches, with what they
cost (evaluations counted, wall seconds), into one samples.npz.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from guidelab import dist, guidance, networks, sampling, shards
from guidelab.conditions import check_values, labels_of, requested
from guidelab.errors import GuidelabError
from guidelab.guidance import GuidanceSpec
from guidelab.guided import measured_flops
from guidelab.images import to_uint8
from guidelab.metrics import BACKENDS, find_inception_weights
from guidelab.networks import Networks
from guidelab.pretrained import is_reference
from guidelab.registry import OneOf, Range


@dataclass
class Drawn:
    """A run's samples, on rank 0: what it drew or kept, and what drawing it cost."""

    images: np.ndarray  # uint8 NHWC, in the order of the requested labels
    labels: np.ndarray  # int64, the class asked of each sample
    counts: list[dict]  # each rank's evaluations: nfe, classifier_nfe, classifier_seconds (shards.COUNTS)
    seconds: float  # wall seconds of the sampling loop (a reused batch adds the seconds it took when drawn)
    kept: bool = False  # a finished run's samples.npz, kept by a resume (not drawn again)
    request: tuple = (None, None)  # the conditions asked of each sample and their NOT (`request_of`)


def check(cfg) -> GuidanceSpec:
    """Every value check of a sampling run that needs no network, for every job of a sweep before the first one runs;
    returns the run's guidance, resolved (and checked) once."""
    spec = guidance.resolve_config(cfg)
    sampling.SAMPLERS.check(cfg.sampler.name, {k: v for k, v in cfg.sampler.items() if k != "name"})
    for key in ("num_samples", "batch_size"):
        Range(1).check(key, cfg[key], cfg)
    Range(0, why="the k-NN judge's neighbours among the real training images; 0 = off").check(
        "eval.knn_k", cfg.eval.knn_k, cfg.eval
    )
    Range(0, 2**43, "batch b's noise seed, seed * 1000003 + b, must fit torch's 64-bit seed").check(
        "seed", cfg.seed, cfg
    )
    check_values(*(_given(cfg.get(key)) for key in ("attrs", "negative", "weights")))
    if cfg.ckpt == "latest":  # nothing to find: say so before Hydra makes a run dir
        networks.find_latest(cfg.runs_root, "diffusion")
    for key in ("ckpt", "guide_ckpt"):
        if is_reference(cfg[key]):  # a diffusers model: found, its schedule read, the guidance's predictions checked
            networks.check_pretrained(spec, cfg[key])
    if cfg.second_evaluator_ckpt and not cfg.evaluator_ckpt:
        raise GuidelabError(
            "second_evaluator_ckpt is set but evaluator_ckpt is not; give the primary evaluator too "
            "(evaluator_ckpt=PATH or latest)"
        )
    if cfg.eval.enabled:
        if not cfg.evaluator_ckpt:
            raise GuidelabError(
                "eval=true needs evaluator_ckpt=PATH (or latest): accuracy and evaluator features; "
                "train one with `python train_classifier.py classifier=evaluator dataset=...`"
            )
        OneOf(BACKENDS).check("metrics.features", cfg.metrics.features, cfg.metrics)
        if cfg.metrics.features == "inception":
            find_inception_weights(cfg.metrics.inception_weights)
    return spec


def request_of(cfg, nets: Networks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The condition of every sample the run draws (eval.num_samples of them with eval=true, else num_samples): plain
    labels, or condition rows where attributes or labels=any are asked; and the request's NOT (None without)."""
    labels = OmegaConf.to_container(cfg.labels) if OmegaConf.is_list(cfg.labels) else cfg.labels
    class_names = nets.train_config["data_info"].get("class_names")  # labels=[cat,dog] by name
    wanted = cfg.eval.num_samples if cfg.eval.enabled else cfg.num_samples
    attrs, negative = (_given(cfg.get(key)) for key in ("attrs", "negative"))
    return requested(labels, attrs, wanted, nets.num_classes, class_names, nets.paths["ckpt"], negative)


def _given(node) -> dict:
    """The keys of a config block (attrs, not, weights) that are set, as plain values."""
    values = OmegaConf.to_container(node) if OmegaConf.is_config(node) else dict(node or {})
    return {k: v for k, v in values.items() if v is not None}


def run(cfg, spec: GuidanceSpec, nets: Networks, run_dir: Path, device: torch.device) -> Drawn | None:
    """Every sample of the run, on rank 0 (None on the other ranks): a finished run's samples.npz kept under resume
    (a resumed sweep does not draw its finished jobs again), else drawn, the finished batches of a killed run reused,
    and written to run_dir/samples.npz."""
    if cfg.compile:  # CUDA graphs on CUDA: every step of a batch has the same shapes
        mode = "reduce-overhead" if device.type == "cuda" and cfg.compile_backend == "inductor" else None
        nets.unet.net = torch.compile(nets.unet.net, backend=cfg.compile_backend, dynamic=False, mode=mode)
    y_all, negative = request_of(cfg, nets)
    y_np = labels_of(y_all).numpy().astype(np.int64)
    key = shards.job_key(cfg, nets.paths, device.type)
    done = shards.written(run_dir, key, cfg.resume, y_np)
    drawn = draw_all(cfg, spec, nets, (y_all, negative), key, run_dir, device) if done is None else None
    dist.cleanup()
    if not dist.is_main():  # rank 0 gathered every rank's batches
        return None
    if done is not None:
        return Drawn(done[0], y_np, done[1], done[2], kept=True, request=(y_all, negative))
    images, counts, seconds = drawn
    shards.finish(run_dir, images, y_np, counts, seconds)  # the batches go; what they cost stays, for a resume
    return Drawn(images, y_np, counts, seconds, request=(y_all, negative))


def draw_all(cfg, spec, nets, request: tuple, key: dict, run_dir: Path, device: torch.device):
    """Every batch of the run, this rank's share drawn (or reused from RUN/shards after a kill) and gathered on rank
    0: (images in batch order, each rank's evaluation counts, seconds), None on the other ranks. `request`: the
    conditions and the NOT of every sample (`request_of`)."""
    y_all, negative = request
    world, rank, is_main = dist.world_size(), dist.rank(), dist.is_main()
    starts = list(range(0, len(y_all), cfg.batch_size))
    reuse = shards.start(run_dir, key, cfg.resume)  # resume=true: the finished batches
    dist.barrier()  # every rank has read the shards (and rank 0 written job.json) before any rank writes one
    if reuse and is_main:
        print(
            f"resume: {len(reuse)} of {len(starts)} batches were drawn before; "
            f"drawing the other {len(starts) - len(reuse)}"
        )
    sampler = sampling.SAMPLERS.own(cfg.sampler)  # the sampler's own keys (eta); steps, spacing, clip_x0 are shared
    mine, drawn_before, t0 = [], [], time.perf_counter()
    for b in tqdm(
        range(rank, len(starts), world),
        desc=f"sample {spec.name} s={spec.scale}",
        dynamic_ncols=True,
        disable=not (cfg.progress and is_main),
    ):
        y_cpu = y_all[starts[b] : starts[b] + cfg.batch_size]
        labels = labels_of(y_cpu).numpy()
        if b in reuse:
            images, counts = shards.load(reuse[b], labels)
            mine.append((b, images))
            drawn_before.append(counts)
            continue
        before, tb = nets.evaluations(), time.perf_counter()
        away = None if negative is None else negative[starts[b] : starts[b] + cfg.batch_size].to(device)
        mine.append((b, draw(cfg, spec, nets, y_cpu.to(device), b, sampler, device, away)))
        cost = {k: None if v is None else v - before[k] for k, v in nets.evaluations().items()}
        shards.save(run_dir, b, mine[-1][1], labels, cost | {"seconds": time.perf_counter() - tb})
    counts = nets.evaluations()  # this run's draws, plus what the reused batches cost when they were drawn
    for c in drawn_before:
        counts = {k: v if c[k] is None else (v or 0) + c[k] for k, v in counts.items()}
    gathered = dist.gather((mine, counts, sum(c["seconds"] for c in drawn_before)))
    seconds = time.perf_counter() - t0
    dist.cleanup()
    if not is_main:
        return None
    seconds += sum(g[2] for g in gathered) / world  # the reused batches' own seconds, spread over the ranks
    images = np.concatenate([img for _, img in sorted(sum((g[0] for g in gathered), []), key=lambda item: item[0])])
    return images, [g[1] for g in gathered], seconds


def draw(cfg, spec, nets, y: torch.Tensor, b: int, sampler: dict, device: torch.device, negative=None) -> np.ndarray:
    """Batch b's samples (uint8 NHWC) for the conditions y (and their NOT): its noise from seed * 1000003 + b, the
    guidance, the sampler."""
    unet = nets.unet
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + b)
    noise = torch.randn((len(y), unet.in_channels, unet.image_size, unet.image_size), device=device, generator=gen)
    weights = _given(cfg.get("weights"))
    regressor = getattr(nets, "regressor", None)
    eps_fn = guidance.make_eps_fn(
        spec, unet, y, nets.classifier, nets.diffusion, nets.guide, negative, weights, regressor
    )
    s = cfg.sampler
    return to_uint8(
        sampling.sample(s.name, eps_fn, nets.diffusion, noise, s.steps, s.spacing, s.clip_x0, gen, **sampler)
    )


def flops_per_sample(cfg, spec, nets, request: tuple, device: torch.device) -> float:
    """The FLOPs of one sample (`measured_flops`), counted on a separate run of the first 4 requested conditions (and
    their NOT) through the same guidance and sampler (after the counted run: its NFE and seconds are untouched)."""
    y_all, negative = request
    y = y_all[:4].to(device)
    away = None if negative is None else negative[:4].to(device)
    sampler = sampling.SAMPLERS.own(cfg.sampler)
    return measured_flops(draw, cfg, spec, nets, y, 0, sampler, device, away) / len(y)
