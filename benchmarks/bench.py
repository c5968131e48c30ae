"""Throughput benchmark: training images/s, FLOPs per image, MFU and peak memory for our UNets and the noisy
classifier, sampling image-steps/s for none / cfg / cg, and the same figures for diffusers' UNet2DModel at the
matching layout when diffusers is installed (`pip install -e '.[bench]'`), with our/peer ratios. The networks are
the configs/model/ and configs/classifier/ options the trainings use.

    python benchmarks/bench.py               # full sizes on CUDA, tiny sizes on the CPU (so that it is testable)
    python benchmarks/bench.py --size tiny --json out.json
    python benchmarks/bench.py --levers      # also: each speed lever on and off (decides the config defaults)

MFU = 3 x forward FLOPs x images/s / peak (dense bf16 peak of the GPU where known; the backward costs about 2x the
forward). FLOPs are counted by torch.utils.flop_counter on one forward pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from guidelab import sampling
from guidelab.diffusion import Diffusion, linear_betas, scheduler_betas
from guidelab.dist import select_device
from guidelab.guidance import make_eps_fn, resolve
from guidelab.models import NoisyClassifier, UNet, build_classifier, build_unet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s by GPU name fragment


@dataclass
class Case:
    name: str
    channels: int  # image channels
    size: int  # image size
    batch: int
    model: str  # a configs/model/ option
    classifier: str  # a configs/classifier/ option

    @property
    def unet(self) -> dict:
        return OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{self.model}.yaml"))

    def build(self) -> tuple[UNet, NoisyClassifier]:
        cls_cfg = OmegaConf.load(CONFIGS / "classifier" / f"{self.classifier}.yaml")
        return (
            build_unet(self.unet, self.channels, self.size, 10),
            build_classifier(cls_cfg, self.channels, self.size, 10),
        )


FULL = [
    Case("unet_cifar 32px", 3, 32, 128, "unet_cifar", "noisy"),
    Case("unet_small 28px", 1, 28, 256, "unet_small", "noisy"),
]
TINY = [Case("unet_tiny 16px", 1, 16, 16, "unet_tiny", "noisy_tiny")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Seconds per call of fn, after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def forward_flops(net: torch.nn.Module, *inputs) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def train_figures(
    net: torch.nn.Module,
    inputs: tuple,
    target_fn,
    device: torch.device,
    iters: int,
    bf16: bool = True,
    fused: bool = True,
    channels_last: bool = False,
    compile_backend: str | None = None,
) -> dict:
    """img/s of AdamW steps (bf16 autocast and fused AdamW on CUDA unless turned off), FLOPs/img, MFU, peak memory;
    optionally with channels_last memory format and torch.compile (the levers of `--levers`)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt).train()
    inputs = (inputs[0].contiguous(memory_format=fmt), *inputs[1:])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=fused and device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    call = net if compile_backend is None else torch.compile(net, backend=compile_backend)

    def step():
        with autocast:
            loss = target_fn(call(*inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = _timed(step, device, iters, warmup=max(2, iters // 5))
    batch = inputs[0].shape[0]
    flops = forward_flops(net, *inputs)
    img_s = batch / seconds
    peak = peak_flops(device)
    return {
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "gflops_fwd_per_img": flops / 1e9,
        "train_img_s": img_s,
        "mfu": 3 * flops * img_s / peak if peak else None,
        "peak_mem_MB": _peak_memory_mb(device),
    }


def sampling_figures(unet: UNet, classifier: NoisyClassifier, case: Case, device: torch.device, iters: int) -> dict:
    """Image-steps/s of one sampler step's network work: none (one UNet pass), cfg (one doubled-batch pass),
    cg (one UNet pass + classifier forward and input-gradient backward); and the CG / unguided cost ratio."""
    unet, classifier = unet.to(device).eval(), classifier.to(device).eval()
    x = torch.randn(case.batch, case.channels, case.size, case.size, device=device)
    t = torch.randint(0, 1000, (case.batch,), device=device)
    y = torch.randint(0, 10, (case.batch,), device=device)
    out, diffusion = {}, Diffusion(linear_betas(1000)).to(device)  # CG projects its gradient at the step's abar_t
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for mode in ("none", "cfg", "cg"):
            eps_fn = make_eps_fn(resolve(mode, 3.0), unet, y, classifier, diffusion)
            seconds = _timed(lambda fn=eps_fn: fn(x, t), device, iters, warmup=max(2, iters // 5))
            out[f"{mode}_img_steps_s"] = case.batch / seconds
    out["cg_over_none_cost"] = out["none_img_steps_s"] / out["cg_img_steps_s"]
    out["cfg_over_none_cost"] = out["none_img_steps_s"] / out["cfg_img_steps_s"]
    return out


def lever_figures(case: Case, device: torch.device, iters: int, compile_backend: str = "inductor") -> dict:
    """Our UNet's training img/s with each lever on and off, and the CFG sampling step eager vs compiled (on CUDA
    in mode reduce-overhead: CUDA graphs). The config defaults (train.compile, train.channels_last, train.bf16,
    sample.py compile) follow these figures on a GPU."""
    x = torch.randn(case.batch, case.channels, case.size, case.size, device=device)
    t = torch.randint(0, 1000, (case.batch,), device=device)
    y = torch.randint(0, 11, (case.batch,), device=device)
    target = lambda eps: eps.float().pow(2).mean()
    variants = {
        "fp32": dict(bf16=False, tf32=False),
        "fp32+tf32": dict(bf16=False),
        "bf16 (default)": {},
        "bf16 foreach AdamW": dict(fused=False),
        "bf16+channels_last": dict(channels_last=True),
        "bf16+compile": dict(compile_backend=compile_backend),
        "bf16+compile+channels_last": dict(compile_backend=compile_backend, channels_last=True),
    }
    out = {}
    for name, kw in variants.items():
        tf32 = kw.pop("tf32", True)  # TF32 is on in every run of the benchmark but the plain fp32 one
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        torch.manual_seed(0)
        unet = case.build()[0]
        out[f"train_img_s[{name}]"] = train_figures(unet, (x, t, y), target, device, iters, **kw)["train_img_s"]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    unet = case.build()[0].to(device).eval()
    mode = "reduce-overhead" if device.type == "cuda" and compile_backend == "inductor" else None
    for name, net in (("eager", unet), ("compiled", torch.compile(unet, backend=compile_backend, mode=mode))):
        eps_fn = make_eps_fn(resolve("cfg", 3.0), net, y)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            seconds = _timed(lambda fn=eps_fn: fn(x, t).eps.clone(), device, iters, warmup=max(3, iters // 5))
        out[f"cfg_img_steps_s[{name}]"] = case.batch / seconds
    return out


def peer_figures(case: Case, device: torch.device, iters: int) -> dict | None:
    """diffusers' UNet2DModel at the matching layout (class-conditional via num_class_embeds), or None if absent."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    layout = case.unet
    levels = len(layout["channel_mult"])
    widths = tuple(layout["channels"] * m for m in layout["channel_mult"])
    attn = [case.size // 2**i in layout["attn_resolutions"] for i in range(levels)]
    net = UNet2DModel(
        sample_size=case.size,
        in_channels=case.channels,
        out_channels=case.channels,
        block_out_channels=widths,
        layers_per_block=layout["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        num_class_embeds=11,
        dropout=layout["dropout"],
        norm_num_groups=min(32, widths[0] // 4),
    )  # as our group_norm: 32 groups, fewer when narrow
    x = torch.randn(case.batch, case.channels, case.size, case.size, device=device)
    t = torch.randint(0, 1000, (case.batch,), device=device)
    y = torch.randint(0, 11, (case.batch,), device=device)
    figures = train_figures(net, (x, t, y), lambda out: out.sample.float().pow(2).mean(), device, iters)
    net.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
        seconds = _timed(lambda: net(xx, tt, yy), device, iters, warmup=max(2, iters // 5))
    figures["cfg_img_steps_s"] = case.batch / seconds
    figures.update(wrapper_figures(net, x, y, device, iters))
    return figures


def wrapper_figures(net, x: torch.Tensor, y: torch.Tensor, device: torch.device, iters: int, steps: int = 10) -> dict:
    """A UNet2DModel sampled inside guidelab (DiffusersUNet, guidance=none, DDIM on the leading grid) against the bare
    diffusers loop (DDIMScheduler.step over the same model) at the same batch: images x steps per second each, so that
    their ratio is what the wrapper, the eps-function and guidelab's sampler cost."""
    from diffusers import DDIMScheduler

    from guidelab.models.diffusers_unet import DiffusersUNet

    linear = {"beta_schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    diffusion = Diffusion(scheduler_betas(linear)).to(device)
    eps_fn = make_eps_fn(resolve("none"), DiffusersUNet(net, diffusion.abar, null_class=10).to(device), y)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(steps)

    def bare():
        sample = x
        for t in scheduler.timesteps:
            sample = scheduler.step(net(sample, t.to(device), y).sample, t, sample).prev_sample

    def ours():
        sampling.sample("ddim", eps_fn, diffusion, x, steps, "leading", False)

    out = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for key, fn in (("bare_loop_img_steps_s", bare), ("wrapped_img_steps_s", ours)):
            out[key] = x.shape[0] * steps / _timed(fn, device, iters, warmup=max(1, iters // 5))
    return out


def run(
    size: str, device: torch.device, iters: int, levers: bool = False, compile_backend: str = "inductor"
) -> list[dict]:
    rows = []
    for case in FULL if size == "full" else TINY:
        unet, classifier = case.build()
        x = torch.randn(case.batch, case.channels, case.size, case.size, device=device)
        t = torch.randint(0, 1000, (case.batch,), device=device)
        y = torch.randint(0, 11, (case.batch,), device=device)
        ours = train_figures(unet, (x, t, y), lambda eps: eps.float().pow(2).mean(), device, iters)
        cls = train_figures(classifier, (x, t), lambda logits: logits.float().logsumexp(-1).mean(), device, iters)
        ours.update(sampling_figures(unet, classifier, case, device, iters))
        row = {
            "case": case.name,
            "batch": case.batch,
            "device": str(device),
            "ours": ours,
            "classifier": cls,
            "peer": peer_figures(case, device, iters),
            # the levers on the first (largest) case only: each compiled variant costs a compilation
            "levers": lever_figures(case, device, iters, compile_backend) if levers and not rows else None,
        }
        if row["peer"]:
            row["ratios"] = {
                "train_img_s": ours["train_img_s"] / row["peer"]["train_img_s"],
                "cfg_img_steps_s": ours["cfg_img_steps_s"] / row["peer"]["cfg_img_steps_s"],
                "wrapper_over_bare": row["peer"]["wrapped_img_steps_s"] / row["peer"]["bare_loop_img_steps_s"],
            }
        rows.append(row)
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        print(f"== {row['case']}, batch {row['batch']}, {row['device']}")
        for who in ("ours", "classifier", "peer", "levers"):
            if who == "levers" and row[who] is None:
                continue
            if row[who] is None:
                print(f"  {who:10s} diffusers not installed: pip install -e '.[bench]' for the peer figures")
                continue
            print(f"  {who:10s} " + "  ".join(f"{k} {_fmt(v)}" for k, v in row[who].items()))
        if "ratios" in row:
            print("  ours/peer  " + "  ".join(f"{k} {_fmt(v)}x" for k, v in row["ratios"].items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="guidelab throughput benchmark")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--size", default=None, choices=["tiny", "full"], help="default: full on CUDA, tiny on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--levers",
        action="store_true",
        help="also time each speed lever on and off (on the first case: unet_cifar at full size)",
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the lever runs")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    size = args.size or ("full" if device.type == "cuda" else "tiny")
    rows = run(size, device, args.iters or (20 if device.type == "cuda" else 3), args.levers, args.compile_backend)
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
