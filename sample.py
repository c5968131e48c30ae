"""Sample from a trained diffusion UNet with or without guidance, and judge the samples.

    python sample.py guidance=cfg scale=3.0      # ckpt=latest: the newest train_diffusion run under outputs/
    python sample.py ckpt=RUN/checkpoints/last.pt guidance=cg classifier_ckpt=CLS/checkpoints/last.pt scale=3.0

The story: load the networks, then per batch draw the noise, build the guidance eps-function and run the sampler;
write samples.npz and grid.png; evaluate into metrics.json. Batch b draws its noise from seed * 1000003 + b and runs on
DDP rank b % world, so the samples do not depend on the number of ranks. Each finished batch is written to
RUN/shards/ at once: after a kill, the same command with resume=true draws only the missing batches
(guidelab.shards).
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from guidelab import dist, guidance, networks, sampling, shards
from guidelab.cli import main
from guidelab.conditions import requested_labels
from guidelab.errors import GuidelabError
from guidelab.guidance import GuidanceSpec
from guidelab.guided import measured_flops
from guidelab.images import save_class_grid, to_uint8
from guidelab.losses import trained_label
from guidelab.metrics import (
    BACKENDS,
    EvaluatorFeatures,
    class_accuracy,
    evaluate_samples,
    extract,
    find_inception_weights,
    knn_judge,
)
from guidelab.pretrained import is_reference
from guidelab.registry import OneOf, Range
from guidelab.report import COLUMNS, make_row


def check(cfg) -> GuidanceSpec:
    """Every value check that needs no network, for every job of a sweep before the first one runs; returns the
    run's guidance, resolved (and checked) once."""
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


def sample(cfg, run_dir: Path) -> dict:
    spec = check(cfg)
    device = dist.setup(dist.select_device(cfg.device))
    is_main = dist.is_main()
    nets = networks.for_sampling(cfg, spec, device)
    if is_main and (run_dir / ".hydra").is_dir():  # the run's config records the checkpoints `latest` chose
        OmegaConf.save(OmegaConf.merge(cfg, nets.paths), run_dir / ".hydra" / "config.yaml")
    if cfg.compile:  # CUDA graphs on CUDA: every step of a batch has the same shapes
        mode = "reduce-overhead" if device.type == "cuda" and cfg.compile_backend == "inductor" else None
        nets.unet.net = torch.compile(nets.unet.net, backend=cfg.compile_backend, dynamic=False, mode=mode)
    num_classes = nets.num_classes
    labels = OmegaConf.to_container(cfg.labels) if OmegaConf.is_list(cfg.labels) else cfg.labels
    class_names = nets.train_config["data_info"].get("class_names")  # labels=[cat,dog] by name; grid row labels
    wanted = cfg.eval.num_samples if cfg.eval.enabled else cfg.num_samples
    y_all = requested_labels(labels, wanted, num_classes, class_names, nets.paths["ckpt"])
    sampler = sampling.SAMPLERS.own(cfg.sampler)  # the sampler's own keys (eta); steps, spacing, clip_x0 are shared
    y_np = y_all.numpy().astype(np.int64)
    key = shards.job_key(cfg, nets.paths)
    done = shards.written(run_dir, key, cfg.resume, y_np)  # a resumed sweep's job that had finished: not redrawn
    drawn = draw_all(cfg, spec, nets, y_all, key, run_dir, device) if done is None else done
    dist.cleanup()
    if not is_main:  # rank 0 gathered every rank's batches
        return {}
    images, counts, seconds = drawn
    if done is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".samples.tmp.npz"
        np.savez(tmp, images=images, labels=y_np)
        os.replace(tmp, run_dir / "samples.npz")
        shards.close(run_dir, counts, seconds)  # the batches go; what they cost stays, for a resumed sweep
    save_class_grid(images, y_np, num_classes, run_dir / "grid.png", class_names=class_names)
    result, details = results_row(cfg, spec, nets, counts, seconds, images, y_np, device)
    result["gflops_per_sample"] = flops_per_sample(cfg, spec, nets, y_all, sampler, device) / 1e9
    if nets.evaluators:
        (run_dir / "metrics.json").write_text(
            json.dumps({k: v for k, v in result.items() if COLUMNS[k].json} | details, indent=2) + "\n"
        )
    shown = {k: result[k] for k in ("fid", "is", "precision", "recall", "accuracy") if result[k] is not None}
    print(
        f"{'wrote' if done is None else 'kept the finished'} {run_dir / 'samples.npz'} and wrote {run_dir / 'grid.png'}"
        f" ({len(y_np)} samples, {seconds:.1f} s)" + "".join(f"; {k} {v:.3f}" for k, v in shown.items())
    )
    return result


def draw_all(cfg, spec, nets, y_all: torch.Tensor, key: dict, run_dir: Path, device: torch.device):
    """Every batch of the run, this rank's share drawn (or reused from RUN/shards after a kill) and gathered on rank
    0: (images in batch order, each rank's evaluation counts, seconds), None on the other ranks."""
    world, rank, is_main = dist.world_size(), dist.rank(), dist.is_main()
    starts = list(range(0, len(y_all), cfg.batch_size))
    reuse = shards.start(run_dir, key, cfg.resume)  # resume=true: the finished batches
    dist.barrier()  # every rank has read the shards before any rank writes one
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
        if b in reuse:
            images, counts = shards.load(reuse[b], y_cpu.numpy())
            mine.append((b, images))
            drawn_before.append(counts)
            continue
        before, tb = nets.evaluations(), time.perf_counter()
        mine.append((b, draw(cfg, spec, nets, y_cpu.to(device), b, sampler, device)))
        cost = {k: None if v is None else v - before[k] for k, v in nets.evaluations().items()}
        shards.save(run_dir, b, mine[-1][1], y_cpu.numpy(), cost | {"seconds": time.perf_counter() - tb})
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


def draw(cfg, spec, nets, y: torch.Tensor, b: int, sampler: dict, device: torch.device) -> np.ndarray:
    """Batch b's samples (uint8 NHWC) for the labels y: its noise from seed * 1000003 + b, the guidance, the sampler."""
    unet = nets.unet
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + b)
    noise = torch.randn((len(y), unet.in_channels, unet.image_size, unet.image_size), device=device, generator=gen)
    eps_fn = guidance.make_eps_fn(spec, unet, y, nets.classifier, nets.diffusion, nets.guide)
    s = cfg.sampler
    return to_uint8(
        sampling.sample(s.name, eps_fn, nets.diffusion, noise, s.steps, s.spacing, s.clip_x0, gen, **sampler)
    )


def flops_per_sample(cfg, spec, nets, y_all: torch.Tensor, sampler: dict, device: torch.device) -> float:
    """The FLOPs of one sample (`measured_flops`), counted on a separate run of the first 4 requested labels through
    the same guidance and sampler (after the counted run: its NFE and seconds are untouched)."""
    y = y_all[:4].to(device)
    return measured_flops(draw, cfg, spec, nets, y, 0, sampler, device) / len(y)


def results_row(
    cfg,
    spec: GuidanceSpec,
    nets: networks.Networks,
    counts: list[dict],
    seconds: float,
    images: np.ndarray,
    y_np: np.ndarray,
    device: torch.device,
) -> tuple[dict, dict]:
    """The run's results row (guidelab.report.ROW), and the evaluators' details that are no column (per-class
    accuracy, the reference set used): what metrics.json holds."""
    n = len(y_np)
    per_sample = {k: sum(c[k] for c in counts) / n for k in ("nfe", "classifier_nfe")}
    own = sampling.SAMPLERS.own(cfg.sampler)
    defaults = {k: p.default for k, p in sampling.SAMPLERS.get_entry(cfg.sampler.name).params.items()}
    classifier_seconds = None if nets.classifier is None else sum(c["classifier_seconds"] for c in counts)
    values = {
        **spec.row(nets.paths.get("guide_ckpt")),
        "sampler": cfg.sampler.name,
        "sampler_options": " ".join(f"{k}={v}" for k, v in own.items() if v != defaults[k]) or None,
        "spacing": cfg.sampler.spacing,
        "steps": cfg.sampler.steps,
        **per_sample,
        "num_samples": n,
        "seconds": seconds,
        "seconds_per_sample": seconds / n,
        "seed": cfg.seed,
        "classifier_share": None if classifier_seconds is None else classifier_seconds / (seconds * len(counts)),
        "p_uncond": nets.train_config["model"].get("p_uncond"),
        "trained": trained_label(nets.train_config),
        "ckpt": nets.paths["ckpt"],
        "classifier": Path(nets.paths["classifier_ckpt"]).parts[-3] if "classifier_ckpt" in nets.paths else None,
        "classifier_test_acc": {
            k[len("test_acc_") :] or "clean": v for k, v in nets.classifier_metrics.items() if k.startswith("test_acc")
        }
        or None,
    }
    details = {}
    for i, (evaluator, ev_config, ev_metrics) in enumerate(nets.evaluators):  # the primary, then the second opinion
        suffix, key = ("", "evaluator_ckpt") if i == 0 else ("_2", "second_evaluator_ckpt")
        values[f"evaluator{suffix}"] = ev_config["classifier"]["name"]
        values[f"evaluator{suffix}_test_acc"] = ev_metrics.get("test_acc")  # how good the judge is on real data
        if cfg.eval.enabled:
            scores = evaluate_samples(
                images,
                y_np,
                cfg.metrics,
                nets.train_config["dataset"],
                evaluator,
                nets.paths[key],
                device,
                cfg.metrics.features if i == 0 else "evaluator",
            )
        else:
            scores = class_accuracy(extract(EvaluatorFeatures(evaluator), images, device).logits, y_np)
        for k, v in scores.items():
            (values if f"{k}{suffix}" in COLUMNS else details)[f"{k}{suffix}"] = v
    if len(nets.evaluators) == 2:
        values["disagreement"] = values["accuracy"] - values["accuracy_2"]
    if nets.evaluators and cfg.eval.knn_k:  # the third judge, beside the two: no weights, no gradient reaches it
        data = nets.train_config["dataset"]  # a diffusers model may name none: the judges' own data then
        data = data if data.get("name") else nets.evaluators[0][1]["dataset"]
        scores = knn_judge(images, y_np, data, cfg.eval.knn_k, cfg.metrics.cache_dir, device)
        for k, v in scores.items():
            (values if k in COLUMNS else details)[k] = v
    return make_row(**values), details


if __name__ == "__main__":
    main(
        Path(__file__).parent / "configs",
        "sample",
        sample,
        check=check,
        protect="samples",
        aliases={"eval": "eval.enabled"},
    )
