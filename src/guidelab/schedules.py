"""A run's noise schedule: named in its `diffusion` config (linear, cosine at T steps) or read from a diffusers model's
scheduler config (`schedule: pretrained`, guidelab.pretrained); its process (`process`) and its signature in diffusers'
terms (`schedule_signature`), by which networks trained on the same schedule are matched however it was named. The
maths of a process given its betas is guidelab.diffusion's; the files are read here, through guidelab.pretrained."""

from __future__ import annotations

import math

from guidelab.diffusion import Diffusion, make_betas, scheduler_betas
from guidelab.errors import GuidelabError
from guidelab.pretrained import model_reference, read_schedule


def process(cfg) -> Diffusion:
    """The T-step process of a `diffusion` config group: {schedule: linear | cosine, num_steps}, or {schedule:
    pretrained, model: diffusers:PATH | hub:ORG/NAME} (the schedule of that model's scheduler config)."""
    if cfg["schedule"] == "pretrained":
        return Diffusion(scheduler_betas(read_schedule(model_reference(cfg))))
    if int(cfg["num_steps"]) < 2:
        raise GuidelabError(f"diffusion.num_steps must be at least 2, got {cfg['num_steps']}")
    return Diffusion(make_betas(cfg["schedule"], int(cfg["num_steps"])))


def schedule_signature(cfg) -> dict:
    """A `diffusion` config's schedule in diffusers' terms {beta_schedule, num_steps, beta_start, beta_end}, so that
    networks of the same schedule match however it was named: guidelab's linear at T steps is diffusers' linear from
    1e-4 * 1000 / T to 0.02 * 1000 / T, its cosine is squaredcos_cap_v2; `schedule: pretrained` reads the model's."""
    if cfg["schedule"] == "pretrained":
        return {k: v for k, v in read_schedule(model_reference(cfg)).items() if k != "prediction_type"}
    T = int(cfg["num_steps"])
    if cfg["schedule"] == "cosine":
        return {"beta_schedule": "squaredcos_cap_v2", "num_steps": T, "beta_start": None, "beta_end": None}
    return {"beta_schedule": "linear", "num_steps": T, "beta_start": 1000 / T * 1e-4, "beta_end": 1000 / T * 0.02}


def same_schedule(a: dict, b: dict) -> bool:
    """Whether two schedule signatures describe the same betas (beta bounds to 1e-9 relative)."""
    close = lambda u, v: u == v or (isinstance(u, float) and isinstance(v, float) and math.isclose(u, v, rel_tol=1e-9))
    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
