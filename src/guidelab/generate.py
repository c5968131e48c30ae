"""What `sample.py` does: load the networks from their checkpoints, build the guidance eps-function, run the sampler
in batches, and write samples.npz, grid.png and (with an evaluator) metrics.json into the run dir."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from guidelab import checkpoint, dist, sampling
from guidelab.diffusion import Diffusion
from guidelab.errors import GuidelabError
from guidelab.guidance import CFG_SCALE_MODES, CLASSIFIER_MODES, in_interval, make_eps_fn
from guidelab.images import save_class_grid, to_uint8
from guidelab.metrics import (BACKENDS, EvaluatorFeatures, class_accuracy, evaluate_samples, extract,
                              find_inception_weights)
from guidelab.models import build_classifier, build_unet
from guidelab.train import select_device


def load_network(path: str, kind: str, device: torch.device):
    """Rebuild a network from the config embedded in its checkpoint and load its EMA weights (eval mode)."""
    ckpt = checkpoint.load(path, kind=kind)
    cfg, info = ckpt["config"], ckpt["config"]["data_info"]
    build = build_unet if kind == "diffusion" else build_classifier
    net = build(cfg["model"] if kind == "diffusion" else cfg["classifier"], info["channels"],
                cfg["dataset"]["image_size"], info["num_classes"])
    try:
        net.load_state_dict(ckpt["ema"])
    except RuntimeError:
        raise GuidelabError(f"the weights in {path} do not fit the network its own config describes; the checkpoint "
                            "was written by another version of guidelab or edited; retrain it") from None
    return net.to(device).eval(), ckpt


def sample_grid(unet, diffusion: Diffusion, num_classes: int, path: Path, scale: float, steps: int,
                device: torch.device, seed: int, per_class: int = 8) -> None:
    """A quick CFG sample grid (DDIM, one row per class) for monitoring a training run."""
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (len(y), unet.in_channels, unet.image_size, unet.image_size)
    noise = torch.randn(shape, device=device, generator=gen)
    x = sampling.ddim(make_eps_fn("cfg", unet, y, scale), diffusion, noise, steps=steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_class_grid(to_uint8(x), y.cpu().numpy(), num_classes, path, per_row=per_class)


def requested_labels(labels, num_samples: int, num_classes: int) -> torch.Tensor:
    """`labels=null`: all classes, evenly (sample i gets class i % K); otherwise the listed classes in turn."""
    classes = list(range(num_classes)) if labels is None else [labels] if isinstance(labels, int) else list(labels)
    for c in classes:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num_classes:
            raise GuidelabError(f"labels must be class indices in [0, {num_classes}); got {c!r}; "
                                f"e.g. labels=[0,3] or labels=null for all classes")
    return torch.tensor(classes, dtype=torch.long).repeat(num_samples // len(classes) + 1)[:num_samples]


def validate(cfg) -> None:
    """Range checks of the sampling options, before any network is loaded."""
    def number(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GuidelabError(f"{key} must be a number, got {value!r}; e.g. {key}=3.0")
        return value

    if number("scale", cfg.scale) < 0:
        raise GuidelabError(f"scale must be >= 0, got {cfg.scale}; 0 = unconditional, 1 = conditional, >1 = guided")
    validate_guidance(cfg.guidance, cfg.scale, number)
    if not isinstance(cfg.compile, bool):
        raise GuidelabError(f"compile must be true or false, got {cfg.compile!r}")
    for key in ("num_samples", "batch_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise GuidelabError(f"{key} must be a positive integer, got {cfg[key]!r}")
    steps = cfg.sampler.steps
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise GuidelabError(f"sampler.steps must be a positive integer or null (all steps), got {steps!r}")
    if cfg.sampler.spacing not in ("time", "logsnr"):
        raise GuidelabError(f"sampler.spacing must be time or logsnr, got {cfg.sampler.spacing!r}")
    if not 0 <= number("sampler.eta", cfg.sampler.eta) <= 1:
        raise GuidelabError(f"sampler.eta must be in [0, 1], got {cfg.sampler.eta}; 0 = deterministic DDIM")
    if cfg.guidance.name in CLASSIFIER_MODES and not cfg.classifier_ckpt:
        raise GuidelabError(f"guidance={cfg.guidance.name} needs classifier_ckpt=PATH to a noisy classifier; train one "
                            "with `python train_classifier.py dataset=...` (its run dir holds checkpoints/last.pt)")
    if not cfg.ckpt:
        raise GuidelabError("ckpt=PATH is required: the diffusion checkpoint to sample from "
                            "(RUN_DIR/checkpoints/last.pt of `python train_diffusion.py`)")
    if cfg.eval.enabled:  # fail before sampling, not after it
        if not cfg.evaluator_ckpt:
            raise GuidelabError("eval=true needs evaluator_ckpt=PATH (accuracy and evaluator features); train one "
                                "with `python train_classifier.py classifier=evaluator dataset=...`")
        if cfg.metrics.features not in BACKENDS:
            raise GuidelabError(f"unknown metrics.features {cfg.metrics.features!r}; use evaluator or inception")
        if cfg.metrics.features == "inception":
            find_inception_weights(cfg.metrics.inception_weights)


def validate_guidance(g, scale: float, number) -> None:
    """Range checks of each guidance mode's own keys (configs/guidance/<mode>.yaml)."""
    def in_range(key, lo, hi, why):
        value = number(f"guidance.{key}", g[key])
        if not lo <= value <= hi:
            raise GuidelabError(f"guidance.{key} must be in [{lo}, {hi}], got {value}; {why}")

    if g.name == "cfg_cg":
        in_range("classifier_scale", 0, float("inf"), "0 = plain CFG")
    if g.name == "cfg_rescale":
        in_range("phi", 0, 1, "0 = plain CFG, 1 = fully rescaled (Lin et al. use 0.7)")
        if g.space not in ("x0", "eps"):
            raise GuidelabError(f"guidance.space must be x0 or eps, got {g.space!r}; x0 is the paper's form")
    if g.name in ("cfg_interval", "cg_interval"):
        in_range("sigma_lo", 0, float("inf"), "sigma = sqrt((1 - abar_t) / abar_t) >= 0")
        if number("guidance.sigma_hi", g.sigma_hi) <= g.sigma_lo:
            raise GuidelabError(f"guidance.sigma_hi ({g.sigma_hi}) must be above guidance.sigma_lo ({g.sigma_lo}); "
                                "e.g. guidance.sigma_lo=0.28 guidance.sigma_hi=5.42")
    if g.name == "apg":
        in_range("eta", 0, float("inf"), "1 = CFG's parallel part, 0 = none (the paper's choice)")
        in_range("momentum", -0.99, 0.99, "beta; the paper uses negative values such as -0.5")
        if g.norm_threshold is not None:
            in_range("norm_threshold", 1e-6, float("inf"), "r > 0, or null for no cap")
    if g.name == "cfgpp" and not 0 <= scale <= 1:
        raise GuidelabError(f"guidance=cfgpp reads scale as its lambda in [0, 1], got {scale}; e.g. scale=0.6")
    if g.name == "dynamic_threshold":
        in_range("percentile", 0.5, 1, "the quantile of |x0| that is mapped to 1 (Imagen: 0.995)")
    if g.name == "autoguidance" and not g.guide_ckpt:
        raise GuidelabError("guidance=autoguidance needs guidance.guide_ckpt=PATH: a smaller diffusion model or an "
                            "earlier checkpoint of the same run (RUN_DIR/checkpoints/0000500.pt)")


def guidance_params(g) -> dict:
    """The mode's own keys, as make_eps_fn takes them (the guide checkpoint is loaded, not passed)."""
    return {k: v for k, v in g.items() if k not in ("name", "guide_ckpt")}


def load_networks(cfg, device: torch.device) -> dict:
    """The diffusion UNet and, as the config asks, the guidance classifier and the evaluator, each checked against
    the UNet's data (dataset, classes, channels, image size) and role (noisy guide vs clean judge)."""
    unet, unet_ckpt = load_network(cfg.ckpt, "diffusion", device)
    nets = {"unet": unet, "unet_ckpt": unet_ckpt, "classifier": None, "evaluator": None, "evaluator_ckpt": None,
            "guide": None}
    if cfg.guidance.name == "autoguidance":
        guide, guide_ckpt = load_network(cfg.guidance.guide_ckpt, "diffusion", device)
        checkpoint.check_compatible(unet_ckpt, "diffusion checkpoint", guide_ckpt, "guide")
        if guide_ckpt["config"]["diffusion"] != unet_ckpt["config"]["diffusion"]:
            raise GuidelabError("the guide was trained on another noise schedule than the diffusion model "
                                f"({guide_ckpt['config']['diffusion']} vs {unet_ckpt['config']['diffusion']}); use a guide "
                                "trained with the same diffusion= settings")
        nets["guide"] = guide
    if cfg.guidance.name in CLASSIFIER_MODES:
        classifier, cls_ckpt = load_network(cfg.classifier_ckpt, "classifier", device)
        checkpoint.check_compatible(unet_ckpt, "diffusion checkpoint", cls_ckpt, "classifier")
        if not cls_ckpt["config"]["classifier"]["noisy"]:
            raise GuidelabError(f"{cfg.classifier_ckpt} is a clean-image evaluator, not a noisy classifier; train one "
                                "with `python train_classifier.py classifier=noisy` for guidance")
        if cls_ckpt["config"]["diffusion"] != unet_ckpt["config"]["diffusion"]:
            raise GuidelabError("the classifier was trained on another noise schedule than the diffusion model "
                                f"({cls_ckpt['config']['diffusion']} vs {unet_ckpt['config']['diffusion']}); retrain "
                                "it with the same diffusion= settings")
        nets["classifier"] = classifier
    if cfg.evaluator_ckpt:
        evaluator, ev_ckpt = load_network(cfg.evaluator_ckpt, "classifier", device)
        checkpoint.check_compatible(unet_ckpt, "diffusion checkpoint", ev_ckpt, "evaluator")
        if ev_ckpt["config"]["classifier"]["noisy"]:
            raise GuidelabError(f"{cfg.evaluator_ckpt} is a noisy guidance classifier; judge samples with a clean-image "
                                "evaluator (`python train_classifier.py classifier=evaluator`) instead")
        nets["evaluator"], nets["evaluator_ckpt"] = evaluator, ev_ckpt
    return nets


def generate(cfg, run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    validate(cfg)
    device = dist.setup(select_device(cfg.device))
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    nets = load_networks(cfg, device)
    unet, classifier, evaluator = nets["unet"], nets["classifier"], nets["evaluator"]
    if cfg.compile:  # CUDA graphs on CUDA: every step of a batch has the same shapes
        unet = torch.compile(unet, backend=cfg.compile_backend, dynamic=False,
                             mode="reduce-overhead" if device.type == "cuda" and cfg.compile_backend == "inductor" else None)
    train_cfg = nets["unet_ckpt"]["config"]
    num_classes = train_cfg["data_info"]["num_classes"]
    diffusion = Diffusion.from_config(train_cfg["diffusion"]).to(device)

    labels = OmegaConf.to_container(cfg.labels) if OmegaConf.is_list(cfg.labels) else cfg.labels
    y_all = requested_labels(labels, cfg.eval.num_samples if cfg.eval.enabled else cfg.num_samples, num_classes)
    g = cfg.guidance
    params = guidance_params(g)
    starts = list(range(0, len(y_all), cfg.batch_size))
    mine, t0 = [], time.perf_counter()
    # batch b draws its noise from seed * 1000003 + b and runs on rank b % world: the samples do not depend on the
    # number of ranks, and rank 0 reassembles them in batch order
    for b in tqdm(range(rank, len(starts), world), desc=f"sample {g.name} s={cfg.scale}", dynamic_ncols=True,
                  disable=not (cfg.progress and main)):
        y = y_all[starts[b]:starts[b] + cfg.batch_size].to(device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + b)
        noise = torch.randn((len(y), unet.in_channels, unet.image_size, unet.image_size), device=device, generator=gen)
        eps_fn = make_eps_fn(g.name, unet, y, float(cfg.scale), classifier, diffusion, nets["guide"], **params)
        x = sampling.sample(cfg.sampler.name, eps_fn, diffusion, noise, cfg.sampler.steps, cfg.sampler.eta,
                            cfg.sampler.clip_x0, generator=gen, spacing=cfg.sampler.spacing)
        mine.append((b, to_uint8(x)))
    gathered = dist.gather(mine)
    seconds = time.perf_counter() - t0
    dist.cleanup()
    if not main:
        return {}
    images_np = np.concatenate([img for _, img in sorted(sum(gathered, []), key=lambda item: item[0])])
    labels_np = y_all.numpy().astype(np.int64)

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".samples.tmp.npz"
    np.savez(tmp, images=images_np, labels=labels_np)
    os.replace(tmp, run_dir / "samples.npz")
    save_class_grid(images_np, labels_np, num_classes, run_dir / "grid.png")
    respaced = diffusion.respace(cfg.sampler.steps, cfg.sampler.spacing)
    cfg_scale = g.name in CFG_SCALE_MODES  # w = s - 1 is Ho & Salimans' CFG strength; CG and the others have no w
    options = {k: v for k, v in params.items() if k not in ("classifier_scale", "base")}
    if g.name == "autoguidance":  # which guide: its run dir and checkpoint file
        options["guide"] = "/".join(Path(g.guide_ckpt).parts[-3:])
    result = {"guidance": g.name, "scale": float(cfg.scale), "w": float(cfg.scale) - 1 if cfg_scale else None,
              "options": " ".join(f"{k}={v}" for k, v in options.items()) or None, "sampler": cfg.sampler.name,
              "spacing": cfg.sampler.spacing, "steps": respaced.num_steps,
              **network_evaluations(g, float(cfg.scale), respaced.abar.cpu()), "num_samples": len(labels_np),
              "seconds": seconds, "seconds_per_sample": seconds / len(labels_np), "seed": cfg.seed,
              "classifier_scale": g.get("classifier_scale"), "base": g.get("base"),
              "p_uncond": train_cfg["model"].get("p_uncond"), "ckpt": str(cfg.ckpt)}
    if evaluator is not None:
        result["evaluator_test_acc"] = nets["evaluator_ckpt"]["metrics"].get("test_acc")  # how good the judge itself is
    if cfg.eval.enabled:
        result.update(evaluate_samples(images_np, labels_np, cfg.metrics, train_cfg["dataset"], evaluator,
                                       cfg.evaluator_ckpt, device))
    elif evaluator is not None:
        result.update(class_accuracy(extract(EvaluatorFeatures(evaluator), images_np, device).logits, labels_np))
    if evaluator is not None:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    shown = {k: result[k] for k in ("fid", "is", "precision", "recall", "accuracy") if k in result}
    print(f"wrote {run_dir / 'samples.npz'} and {run_dir / 'grid.png'} ({len(labels_np)} samples, {seconds:.1f} s)"
          + "".join(f"; {k} {v:.3f}" for k, v in shown.items()))
    return result


def network_evaluations(guidance, scale: float, abar_steps: torch.Tensor) -> dict:
    """Network passes per sample over the sampler's timesteps (their abar): `nfe` UNet forwards (CFG and its variants
    at s not in {0, 1}: two per step, the doubled batch; only inside the interval for cfg_interval; autoguidance: the
    main model and the guide), `classifier_nfe` classifier forward+backward passes (CG: one per guided step)."""
    steps, name = len(abar_steps), guidance.name
    guided = steps
    if name in ("cfg_interval", "cg_interval"):
        guided = int(in_interval(abar_steps, guidance.sigma_lo, guidance.sigma_hi).sum())
    doubled = name in TWO_PASSES and scale not in TWO_PASSES[name]
    cls_scale = scale if name in ("cg", "cg_interval") else guidance.get("classifier_scale", 0)
    with_classifier = name in CLASSIFIER_MODES and cls_scale != 0
    return {"nfe": steps + (guided if doubled else 0), "classifier_nfe": guided if with_classifier else 0}


# modes that run two UNet passes per step (a doubled batch, or main model + guide), except at these scales
TWO_PASSES = {"cfg": (0.0, 1.0), "cfg_cg": (0.0, 1.0), "dynamic_threshold": (0.0, 1.0), "cfg_interval": (0.0, 1.0),
              "cfg_rescale": (1.0,), "apg": (), "cfgpp": (0.0,), "autoguidance": (1.0,)}
