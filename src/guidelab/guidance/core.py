"""The guidance registry, a run's resolved guidance (`GuidanceSpec`), the context every mode builds on, and the
eps-function factory. The modes themselves live by family in the sibling modules.

A mode is one builder `_mode(ctx, **params) -> eps_fn` registered in MODES: its keyword parameters, with their types and
defaults, are exactly its config keys (the Hydra option `guidance=<mode>` is generated from them), and the decorator
declares the networks it needs besides the UNet, what `scale` means for it (its range; `w`: whether it is a CFG
strength, Ho & Salimans' w = s - 1) and the checks of its values. `resolve` turns a choice into one frozen spec per
run; it is the only place that looks a mode up by name, checks `scale` or reads a mode's traits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from guidelab.conditions import asked, labels_of, null_like
from guidelab.diffusion import Diffusion, gather
from guidelab.errors import GuidelabError
from guidelab.guided import EpsFn, noise_level, timed
from guidelab.registry import Entry, OneOf, Range, Registry

CFG_SCALE = Range(0, math.inf, "0 = unconditional, 1 = conditional, > 1 guided (w = s - 1)")
MODES = Registry(
    "guidance", fixed=("ctx",), needs=(), scale=CFG_SCALE, w=True, uses=("uncond", "cond"), attributes=False, guides=()
)
# needs: classifier (noisy), clean_classifier (clean, called at t = 0; same slot), guide, diffusion
# attributes: whether the mode takes condition rows (measured attributes, labels=any, NOT); guides: the guides whose
# log-likelihood terms it sums, a field each (classifier: the class; regressor: its attributes)
# uses: the diffusion model's predictions the mode asks for: "uncond" (the null class: a model trained with label
# dropout; an unconditional model is one), "cond" (a class input); "base": the one its `base` key names; (): either
SCHEDULE = OneOf(("constant", "linear", "cosine"), "how the CFG weight w = s - 1 varies over t (Wang et al. 2024)")
NEEDS = {
    "classifier": "a noisy classifier: pass classifier_ckpt=PATH (train one with `python train_classifier.py`)",
    "clean_classifier": "a clean-image classifier: pass classifier_ckpt=PATH (train one with "
    "`python train_classifier.py classifier=clean`)",
    "guide": "a guide network: pass guide_ckpt=PATH (a smaller network or an earlier checkpoint of the same "
    "model, e.g. RUN_DIR/checkpoints/0000500.pt)",
    "diffusion": "the noise schedule: pass diffusion=Diffusion(...)",
}


# ---------------------------------------------------------------- algebra shared by the families
def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, Eq. 6 with w = s - 1); torch.lerp is exactly this and
    returns eps_u at s = 0 and eps_c at s = 1 bit for bit."""
    return torch.lerp(eps_uncond, eps_cond, scale)


def in_interval(abar_t: torch.Tensor, sigma_lo: float, sigma_hi: float) -> torch.Tensor:
    """Guidance interval, Kynkaanniemi et al. 2024 ("Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models"): the guidance weight is w for sigma in (sigma_lo, sigma_hi] and 1 (the
    conditional prediction) outside. A boolean per sample."""
    sigma = noise_level(abar_t)
    return (sigma > sigma_lo) & (sigma <= sigma_hi)


def scheduled_weight(w: float, t_frac: float, schedule: str) -> float:
    """Guidance-weight schedulers, Wang et al. 2024 ("Analysis of Classifier-Free Guidance Weight Schedulers", TMLR),
    Sec. 4, the heuristic increasing ones, each scaled to the constant weight's mean over t in [0, 1] (1 = pure
    noise), so that the weight rises as the noise falls at the same total guidance: linear w_t = 2 w (1 - t),
    cosine w_t = w (1 + cos(pi t)); constant w_t = w. Applied to the CFG weight w = s - 1, so every schedule starts
    from the conditional model at t = 1."""
    if schedule == "linear":
        return 2 * w * (1 - t_frac)
    if schedule == "cosine":
        return w * (1 + math.cos(math.pi * t_frac))
    return w


# ---------------------------------------------------------------- one run's guidance, resolved once
@dataclass(frozen=True)
class GuidanceSpec:
    """A guidance choice resolved and checked once per run: the registered mode, all its parameters (defaults filled
    in), the scale and the weight schedule. The networks loader, the eps-function factory and the results row take
    it; nothing else looks the mode up or reads its traits."""

    entry: Entry
    params: Mapping[str, Any]  # every config key of the mode (read-only)
    scale: float
    schedule: str = "constant"

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def needs(self) -> tuple[str, ...]:
        """The networks besides the UNet: classifier, clean_classifier, guide; diffusion (the noise schedule)."""
        scheduled = (
            ("diffusion",) if self.schedule != "constant" and "diffusion" not in self.entry.traits["needs"] else ()
        )
        return tuple(self.entry.traits["needs"]) + scheduled

    @property
    def uses(self) -> tuple[str, ...]:
        """The diffusion model's predictions the mode combines: "uncond" (eps(x_t, null): needs a model trained with
        label dropout, or an unconditional one), "cond" (eps(x_t, y): needs a class input); () works with any model."""
        uses = self.entry.traits["uses"]
        return (self.params["base"],) if uses == "base" else tuple(uses)

    @property
    def w(self) -> float | None:
        """Ho & Salimans' w = s - 1 where `scale` is a CFG strength; None where it means something else (CG's s)."""
        return self.scale - 1 if self.entry.traits["w"] else None

    def row(self, guide_ckpt: str | None = None) -> dict:
        """This guidance's part of the results row; `options` holds the mode's keys, the schedule where it is not
        constant, and which guide network (its run dir and checkpoint file) where the mode has one."""
        options = dict(self.params)
        if self.schedule != "constant":
            options["schedule"] = self.schedule
        if "guide" in self.needs and guide_ckpt:
            options["guide"] = "/".join(Path(guide_ckpt).parts[-3:])
        return {"guidance": self.name, "scale": self.scale, "w": self.w, "options": options}


def resolve(name: str, scale: float = 1.0, schedule: str = "constant", **params) -> GuidanceSpec:
    """The spec of guidance `name` at `scale` with its keys `params` (the rest at their defaults), every value checked:
    the mode's range of `scale`, the schedule (CFG-style modes only) and the mode's own checks."""
    entry = MODES.get_entry(name)
    unknown = sorted(set(params) - set(entry.params))
    if unknown:
        raise GuidelabError(
            f"guidance={name} got unknown options {unknown}; its keys: {', '.join(entry.params) or 'none'}"
        )
    if entry.traits["scale"] is not None:
        entry.traits["scale"].check("scale", scale, {})
    SCHEDULE.check("schedule", schedule, {})
    if schedule != "constant" and not entry.traits["w"]:
        raise GuidelabError(
            f"schedule={schedule} varies the CFG weight w = s - 1, but guidance={name}'s scale is not a CFG weight; "
            "use schedule=constant, or a CFG-style mode"
        )
    MODES.check_values(entry, params)
    values = {k: p.default for k, p in entry.params.items()} | params
    return GuidanceSpec(entry, MappingProxyType(values), float(scale), schedule)


def resolve_config(cfg) -> GuidanceSpec:
    """The spec of a sampling config: `guidance` (name and keys), `scale` and `schedule`."""
    from omegaconf import OmegaConf

    keys = OmegaConf.to_container(cfg.guidance) if OmegaConf.is_config(cfg.guidance) else dict(cfg.guidance)
    name = keys.pop("name")
    return resolve(name, cfg.scale, cfg.schedule, **keys)


def check_model(spec: GuidanceSpec, unet) -> None:
    """Refuse a mode that asks the diffusion model for a prediction it cannot make (`GuidanceSpec.uses`): the
    unconditional one of a class-conditional model without a null class, or the conditional one of an unconditional
    model (guidelab's UNets have both; a diffusers model may have either or neither). An unconditional model (no
    class input) has one prediction, which eps(x_t, y) and eps(x_t, null) both are: a mode that guides the one
    prediction its `base` names takes it at either base; a mode that combines two (CFG) still needs two. The error
    lists the modes that work with the model."""
    conditional = getattr(unet, "conditional", True)
    can = {"uncond": not conditional or getattr(unet, "null_class", None) is not None, "cond": conditional}
    if all(can[u] for u in spec.uses) or (spec.entry.traits["uses"] == "base" and not conditional):
        return
    works = []
    for name, entry in MODES.items():
        uses = entry.traits["uses"]
        if uses == "base":
            default = entry.params["base"].default
            either = can[default] or not conditional
            works += [name] if either else [f"{name} (guidance.base={'cond' if can['cond'] else 'uncond'})"]
        elif all(can[u] for u in uses):
            works.append(name)
    if not can["cond"]:
        why = "the conditional prediction eps(x_t, y), but this diffusion model is unconditional (no class input)"
        why += "; CFG needs a class-conditional model trained with label dropout" if "uncond" in spec.uses else ""
    else:
        why = (
            "the unconditional prediction eps(x_t, null), but this diffusion model has no null class (CFG needs a "
            "model trained with label dropout)"
        )
    raise GuidelabError(f"guidance={spec.name} needs {why}; modes that work with it: {', '.join(works)}")


# ---------------------------------------------------------------- what every builder may use
@dataclass
class Context:
    """What every builder may use: the networks, the labels, the scale and its weight schedule, and the model's own
    noise schedule. Nothing in it changes while a run samples: the scale at a timestep is `scale_at(t)`."""

    unet: torch.nn.Module
    y: torch.Tensor
    scale: float  # the run's s (a scheduled CFG weight's value at t is `scale_at`)
    classifier: torch.nn.Module | None = None
    diffusion: Diffusion | None = None  # the model's T-step process (x0-space and interval modes need it)
    guide: torch.nn.Module | None = None  # the weaker model of autoguidance
    schedule: str = "constant"  # how the CFG weight w = s - 1 varies over t (`scheduled_weight`)
    negative: torch.Tensor | None = None  # the NOT of the request (condition rows), or None
    weights: Mapping[str, float] = field(default_factory=dict)  # composed modes: a field's own weight (else scale)
    regressor: torch.nn.Module | None = None  # the noisy attribute regressor of CG on attributes

    @property
    def labels(self) -> torch.Tensor:
        """The class of each sample (plain labels, or column 0 of condition rows): what a classifier scores."""
        return labels_of(self.y)

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields the request asks for (`conditions.asked`): "label" unless labels=any, and each attribute."""
        return asked(self.y, getattr(self.unet, "null_class", None))

    def weight(self, name: str, default: float | None = None) -> float:
        """A field's weight in a composed mode: weights.<field> where given, else `default` (the run's scale)."""
        value = self.weights.get(name)
        return (self.scale if default is None else default) if value is None else float(value)

    @property
    def away(self) -> torch.Tensor:
        """What CFG's second prediction conditions on: the NOT of the request (a negative prompt, eps(x_t, not) in
        place of eps_u, as negative prompts are applied in Stable Diffusion's pipelines), else the null."""
        return self.null if self.negative is None else self.negative

    def scale_at(self, t: torch.Tensor) -> float:
        """s at the model timesteps t: the run's scale, or under a weight schedule 1 + `scheduled_weight`(s - 1, t / T)
        (the samplers step all samples of a batch together, so t[0] is the batch's t)."""
        if self.schedule == "constant":
            return self.scale
        return 1 + scheduled_weight(self.scale - 1, float(t[0]) / len(self.diffusion.abar), self.schedule)

    @property
    def null(self) -> torch.Tensor:
        """The null labels; an unconditional model (no null class, no class input) ignores labels, so y serves."""
        if self.unet.null_class is None:
            return self.y
        return null_like(self.y, self.unet.null_class)

    def abar_t(self, x, t) -> torch.Tensor:
        return gather(self.diffusion.abar, t, x)

    def to_x0(self, x, t, eps) -> torch.Tensor:
        return self.diffusion.predict_x0(x, t, eps)

    def to_eps(self, x, t, x0) -> torch.Tensor:
        return self.diffusion.eps_from_x0(x, t, x0)

    def pair(self, x, t, other: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps(x_t, other), eps_c) from one doubled batch (cond first); `other` defaults to the null (eps_u), or the
        request's NOT where it has one (`away`)."""
        other = self.away if other is None else other
        eps_cond, eps_other = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, other])).chunk(2)
        return eps_other, eps_cond

    def away_from(self, x, t, perturbed) -> torch.Tensor:
        """eps_pert + s (eps_c - eps_pert): CFG's form with the conditional model run again inside `perturbed()` (a
        context manager that perturbs the network) as the guiding prediction; perturbed = None or s = 1: eps_c alone."""
        eps_c, scale = self.unet(x, t, self.y), self.scale_at(t)
        if scale == 1 or perturbed is None:
            return eps_c
        with perturbed():
            eps_pert = self.unet(x, t, self.y)
        return cfg_combine(eps_pert, eps_c, scale)

    def cfg(self, x, t, scale: float) -> torch.Tensor:
        if scale == 0:  # exactly the unconditional model (or the NOT's): one pass instead of two
            return self.unet(x, t, self.away)
        if scale == 1:  # exactly the conditional model
            return self.unet(x, t, self.y)
        return cfg_combine(*self.pair(x, t), scale)

    def base_labels(self, base: str) -> torch.Tensor:
        return self.y if base == "cond" else self.null

    def timed(self):
        """A block whose wall time counts as the classifier's (`Counted.seconds`; without one, the regressor's): the
        guidance gradients."""
        return timed(self.classifier if self.classifier is not None else self.regressor, self.y.device)


def check_request(spec: GuidanceSpec, unet, y: torch.Tensor, negative=None, regressor=None) -> None:
    """Refuse a request the mode cannot reach, naming the field: every field asked (and every field of the NOT) must
    be conditioned on by the diffusion model's prediction the mode uses (its class input, `model.attributes`) or
    scored by one of the mode's guides (the classifier: the class; the regressor: its attributes)."""
    rows = y.dim() == 2 or negative is not None
    if not rows:
        return
    if not spec.entry.traits["attributes"]:
        takes = ", ".join(n for n, e in MODES.items() if e.traits["attributes"])
        raise GuidelabError(
            f"guidance={spec.name} takes a class label only; attributes, labels=any and negative.* work with {takes}"
        )
    null = getattr(unet, "null_class", None)
    wanted = set(asked(y, null)) | (set(asked(negative, null)) if negative is not None else set())
    model = ("label", *getattr(unet, "attributes", ())) if "cond" in spec.uses else ()
    guides = {"classifier": ("label",), "regressor": tuple(getattr(regressor, "attributes", ()))}
    reach = {f: "the diffusion model" for f in model}
    for kind in spec.entry.traits["guides"]:
        reach.update({f: f"the {kind}" for f in guides[kind] if f not in reach})
    missing = sorted(wanted - set(reach))
    if missing:
        how = "; ".join(f"{f}: {v}" for f, v in sorted(reach.items())) or "nothing"
        raise GuidelabError(
            f"guidance={spec.name} cannot steer {', '.join(missing)}: the diffusion model was not trained on it"
            f"{' and no guide scores it' if spec.entry.traits['guides'] else ''} (reached: {how}); train "
            f"model.attributes=[{','.join(missing)}] or use guidance=cg with regressor_ckpt=a regressor of it"
        )


def make_eps_fn(
    spec: GuidanceSpec,
    unet,
    y: torch.Tensor,
    classifier=None,
    diffusion: Diffusion | None = None,
    guide=None,
    negative: torch.Tensor | None = None,
    weights: Mapping | None = None,
    regressor=None,
) -> EpsFn:
    """The eps-function of the resolved guidance `spec` for labels y: `diffusion` is the model's own T-step process
    (eps-functions get the model's timesteps), `classifier` the noisy or clean one, `guide` autoguidance's. A
    non-constant schedule gives the mode s = 1 + `scheduled_weight`(s - 1, t / T) at every call (`Context.scale_at`).
    y may be condition rows (guidelab.conditions), `negative` the request's NOT, `weights` the composed modes' weight
    per field, `regressor` CG's attribute guide (`check_request` refuses a field the mode cannot reach)."""
    check_model(spec, unet)
    check_request(spec, unet, y, negative, regressor)
    given = {"classifier": classifier, "clean_classifier": classifier, "guide": guide, "diffusion": diffusion}
    for need in spec.needs:
        if given[need] is None:
            raise GuidelabError(f"guidance={spec.name} needs {NEEDS[need]}")
    if classifier is not None and {"classifier", "clean_classifier"} & set(spec.needs):
        classifier.requires_grad_(False)
    if regressor is not None:
        regressor.requires_grad_(False)
    weights = dict(weights or {})
    ctx = Context(unet, y, spec.scale, classifier, diffusion, guide, spec.schedule, negative, weights, regressor)
    return spec.entry.fn(ctx, **spec.params)
