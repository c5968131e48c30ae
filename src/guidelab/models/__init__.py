"""Networks: the class-conditional UNet (eps-prediction) and the time-conditioned classifier.

The builders turn a config group (configs/model/*.yaml, configs/classifier/*.yaml; a DictConfig or a
plain dict) into a network; in_channels, image_size and num_classes come from the dataset.
"""

import inspect
from collections.abc import Mapping

from omegaconf import OmegaConf

from guidelab.errors import GuidelabError
from guidelab.models.classifier import NoisyClassifier
from guidelab.models.unet import UNet

__all__ = ["UNet", "NoisyClassifier", "build_unet", "build_classifier"]

def _kwargs(cls: type, cfg: Mapping, group: str) -> dict:
    """Config keys (but name, noisy: they describe the run) -> constructor keyword arguments (lists as tuples)."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k not in ("name", "noisy")}
    if unknown := sorted(set(kwargs) - set(list(inspect.signature(cls).parameters)[3:])):
        raise GuidelabError(f"{group} config has unknown keys {unknown} for {cls.__name__}")
    return kwargs


def build_unet(model_cfg: Mapping, in_channels: int, image_size: int, num_classes: int) -> UNet:
    """UNet from a `model` config group (keys mirror UNet's keyword arguments, plus `name`)."""
    return UNet(in_channels, image_size, num_classes, **_kwargs(UNet, model_cfg, "model"))


def build_classifier(cls_cfg: Mapping, in_channels: int, image_size: int, num_classes: int) -> NoisyClassifier:
    """NoisyClassifier from a `classifier` config group (keys mirror its keyword arguments, plus `name`, `noisy`)."""
    return NoisyClassifier(in_channels, image_size, num_classes, **_kwargs(NoisyClassifier, cls_cfg, "classifier"))
