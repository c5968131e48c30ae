"""Guidance modes: each turns the networks and the requested labels into `eps_fn(x_t, t) -> Guided` (guided.py).

Samplers know nothing about guidance: they call eps_fn and apply what it returns, each in its own form. The modes
live by family: `cfg_like` (two predictions of the diffusion model combined), `classifier` (a classifier's gradient),
`feedback` (CFG with a scale fed back from the trajectory), `perturbation` (the model against a perturbed copy of
itself); `core` holds the registry, `resolve` (a choice turned into one checked `GuidanceSpec` per run) and
`make_eps_fn` (the spec and the networks turned into an eps-function).
The import order below is the registry's order, which orders the rows of a report.
"""

from guidelab.guidance.cfg_like import (
    apg_combine,
    dynamic_threshold,
    frequency_combine,
    independent_classes,
    lowpass,
    magnitude_scale,
    project,
    rescale_combine,
    tangential_uncond,
    zero_star_scale,
)
from guidelab.guidance.classifier import (
    backward_delta,
    calibrated_log_p,
    sine_boost,
    smoothed_guide,
    softplus_copy,
    x0_classifier_score,
)
from guidelab.guidance.composed import composed_combine
from guidelab.guidance.core import (
    MODES,
    SCHEDULE,
    Context,
    GuidanceSpec,
    cfg_combine,
    check_model,
    in_interval,
    make_eps_fn,
    resolve,
    resolve_config,
    scheduled_weight,
)
from guidelab.guidance.feedback import fbg_scale, log_posterior_step
from guidelab.guidance.gradients import classifier_score, entropy_factor, log_p, tweedie_bound
from guidelab.guidance.perturbation import (
    anneal_condition,
    attention_perturbed,
    blurred_query_attention,
    cads_gamma,
    identity_attention,
    time_noise,
)

__all__ = [
    "MODES",
    "SCHEDULE",
    "Context",
    "GuidanceSpec",
    "cfg_combine",
    "check_model",
    "in_interval",
    "make_eps_fn",
    "resolve",
    "resolve_config",
    "scheduled_weight",
    "apg_combine",
    "dynamic_threshold",
    "frequency_combine",
    "independent_classes",
    "lowpass",
    "magnitude_scale",
    "project",
    "rescale_combine",
    "tangential_uncond",
    "zero_star_scale",
    "composed_combine",
    "fbg_scale",
    "log_posterior_step",
    "backward_delta",
    "calibrated_log_p",
    "classifier_score",
    "entropy_factor",
    "log_p",
    "sine_boost",
    "smoothed_guide",
    "softplus_copy",
    "tweedie_bound",
    "x0_classifier_score",
    "anneal_condition",
    "attention_perturbed",
    "blurred_query_attention",
    "cads_gamma",
    "identity_attention",
    "time_noise",
]
