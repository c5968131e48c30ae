"""Networks: the class-conditional UNet (eps-prediction), the time-conditioned classifier and the evaluators.

The builders turn a config group (configs/model/*.yaml, configs/classifier/*.yaml; a DictConfig or a
plain dict) into a network; in_channels, image_size and num_classes come from the dataset. A classifier config names
its family in `arch` (CLASSIFIERS; checkpoints written before there was a choice are `unet_encoder`; `regressor` is
the noisy attribute regressor, which takes num_classes as every family does and ignores it).
"""

import inspect
from collections.abc import Callable, Mapping

import torch
from omegaconf import OmegaConf

from guidelab.errors import GuidelabError, one_line
from guidelab.models.classifier import NoisyClassifier
from guidelab.models.diffusers_unet import diffusers_layout
from guidelab.models.evaluator import VGG, MLPMixer, ResNet
from guidelab.models.regressor import NoisyRegressor
from guidelab.models.unet import UNet

__all__ = [
    "UNet",
    "NoisyClassifier",
    "NoisyRegressor",
    "ResNet",
    "VGG",
    "MLPMixer",
    "CLASSIFIERS",
    "RUN_KEYS",
    "build_unet",
    "build_classifier",
    "check_buildable",
]
# classifier.arch -> network
CLASSIFIERS = {
    "unet_encoder": NoisyClassifier,
    "resnet": ResNet,
    "vgg": VGG,
    "mixer": MLPMixer,
    "regressor": NoisyRegressor,  # the noisy attribute regressor of CG on attributes (models/regressor.py)
}
RUN_KEYS = {
    "name": "",
    "noisy": False,
    "arch": "unet_encoder",  # classifier keys that describe the run, not the network
    "shift": 0,
    "rotate": 0.0,
    "pgd_eps": 0.0,
    "pgd_steps": 0,
    "pgd_norm": "linf",  # the PGD threat model: linf | l2
    "entropy_weight": 0.0,  # Zheng et al. 2022's entropy constraint: weight of the cross-entropy to uniform (0 = off)
}  # defaults; their types type the schema


def _kwargs(cls: type, cfg: Mapping, group: str) -> dict:
    """Config keys (but RUN_KEYS: they describe the run) -> constructor keyword arguments (lists as tuples)."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    skip = {*RUN_KEYS, "defaults"}  # an option file read as it is carries Hydra's defaults list (its schema)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k not in skip}
    if unknown := sorted(set(kwargs) - set(list(inspect.signature(cls).parameters)[3:])):
        raise GuidelabError(f"{group} config has unknown keys {unknown} for {cls.__name__}")
    return kwargs


def build_unet(model_cfg: Mapping, in_channels: int, image_size: int, num_classes: int):
    """The diffusion network of a `model` config group: guidelab's UNet (keys mirror its keyword arguments, plus
    `name`), or with `arch: diffusers` a diffusers UNet2DModel layout (`diffusers_layout`'s keyword arguments)."""
    if model_cfg.get("arch", "unet") == "diffusers":
        return diffusers_layout(in_channels, image_size, num_classes, **_kwargs(diffusers_layout, model_cfg, "model"))
    return UNet(in_channels, image_size, num_classes, **_kwargs(UNet, model_cfg, "model"))


def build_classifier(cls_cfg: Mapping, in_channels: int, image_size: int, num_classes: int):
    """The classifier of family `arch` from a `classifier` config group (its keys mirror the network's keyword
    arguments, plus RUN_KEYS)."""
    arch = cls_cfg.get("arch", "unet_encoder")
    if arch not in CLASSIFIERS:
        raise GuidelabError(f"unknown classifier.arch '{arch}'; valid: {', '.join(CLASSIFIERS)}")
    cls = CLASSIFIERS[arch]
    return cls(in_channels, image_size, num_classes, **_kwargs(cls, cls_cfg, "classifier"))


MAX_SIZE = 65536  # channels, blocks, heads, resolutions: no network key means anything larger


def check_buildable(group: str, cfg: Mapping, build: Callable) -> None:
    """Build a network on the meta device (no memory, no time) to check the `group` config's arguments: what the
    constructor or torch's layers refuse (a negative width, a dropout outside [0, 1], heads that do not divide the
    channels, an empty channel_mult, ...) becomes one line naming the group, as a refusal and not a traceback."""
    for key, value in cfg.items():  # a loop of 10**12 blocks would not end, even on the meta device
        values = value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and v > MAX_SIZE for v in values):
            raise GuidelabError(
                f"{group}.{key}={value} is beyond any network guidelab could build (sizes up to {MAX_SIZE}); give a "
                "smaller size"
            )
    try:
        with torch.device("meta"):
            build()
    except GuidelabError:
        raise
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError, IndexError, AssertionError, OverflowError) as e:
        raise GuidelabError(
            f"{group}={cfg.get('name', '?')} cannot build its network with these {group}.* values ({one_line(e)}); "
            f"give positive sizes and rates in [0, 1] (`--cfg job` lists the keys)"
        ) from None
