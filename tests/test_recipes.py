"""docs/architecture.md's recipes, followed: a guidance mode, a sampler and a data set are each one registered function,
and with nothing else changed each is a config option, checked, run and reported; every label dropout draws through
guidelab.conditions. The toy entries are removed again after each test."""

import ast
import contextlib
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from conftest import CONFIGS, _script_module
from guidelab import config, guidance, sampling
from guidelab.data import DATASETS, dataset, load_from_config
from guidelab.diffusion import Diffusion, linear_betas
from guidelab.errors import GuidelabError
from guidelab.guidance import MODES, Context
from guidelab.guided import Guided
from guidelab.registry import Range

PROCESS = Diffusion(linear_betas(1000))
SAMPLERS = sampling.SAMPLERS


@contextlib.contextmanager
def registered(registry: dict, name: str, group: str):
    """The toy entry is registered by the test's decorator; this makes it a config option (as the entry points do) and
    removes both afterwards, so that no other test sees it."""
    config.register()
    try:
        yield
    finally:
        registry.pop(name, None)
        ConfigStore.instance().repo[group].pop(f"{name}.yaml", None)


def _compose(script: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=script, overrides=list(overrides))


class Model(torch.nn.Module):
    null_class = 3

    def forward(self, x, t, y):
        return 0.5 * x + (y.view(-1, 1, 1, 1) == 3).float()


def test_a_guidance_mode_is_one_registered_function():
    @MODES.register(needs=("diffusion",), my_weight=Range(0, 1, "the recipe's weight"))
    def _recipe_mode(ctx: Context, my_weight: float = 0.5):
        """eps_u + my_weight * s (eps_c - eps_u)."""
        return lambda x, t: Guided(torch.lerp(*ctx.pair(x, t), my_weight * ctx.scale_at(t)))

    with registered(MODES, "recipe_mode", "guidance"):
        cfg = _compose("sample", "ckpt=RUN/last.pt", "guidance=recipe_mode", "guidance.my_weight=0.2", "scale=2")
        spec = _script_module("sample.py").check(cfg)  # every value check, as for each job of a sweep
        assert spec.name == "recipe_mode" and spec.row()["options"] == {"my_weight": 0.2}
        with pytest.raises(GuidelabError, match=r"guidance.my_weight must be in \[0, 1\], got 3; the recipe's weight"):
            _script_module("sample.py").check(
                _compose("sample", "ckpt=RUN/last.pt", "guidance=recipe_mode", "guidance.my_weight=3")
            )
        x, t, y = torch.randn(2, 1, 2, 2), torch.tensor([10, 10]), torch.tensor([0, 1])
        out = guidance.make_eps_fn(spec, Model(), y, diffusion=PROCESS)(x, t)
        assert torch.allclose(out.eps, torch.lerp(Model()(x, t, torch.full_like(y, 3)), Model()(x, t, y), 0.4))
    assert "recipe_mode" not in MODES


def test_a_sampler_is_one_registered_function_and_applies_every_guidance_term():
    @SAMPLERS.register(steps=10, spacing="linspace")
    @torch.no_grad()
    def recipe_euler(eps_fn, noise, process, *, clip_x0, generator, progress):
        """DDIM with eta = 0, written as the recipe says: the data prediction and eps from `_x0_and_eps`."""
        d, x = process, noise
        for _, t, model_t in sampling._steps(d, x, progress, "recipe"):
            x0, eps = sampling._x0_and_eps(d, x, t, eps_fn(x, model_t), clip_x0)
            abar_prev = sampling.gather(d.abar_prev, t, x)
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        return x

    with registered(SAMPLERS, "recipe_euler", "sampler"):
        cfg = _compose("sample", "ckpt=RUN/last.pt", "sampler=recipe_euler", "sampler.steps=7")
        _script_module("sample.py").check(cfg)
        assert cfg.sampler.steps == 7 and cfg.sampler.spacing == "linspace"

        def eps_fn(x, t):  # a classifier's score and an x0 shift: the recipe's sampler applies both, as DDIM does
            return Guided(PROCESS.eps_from_x0(x, t, 0.3 * torch.tanh(x)), 0.01 * torch.ones_like(x), x0_shift=0.1 * x)

        noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        ours = sampling.sample("recipe_euler", eps_fn, PROCESS, noise, 7, "linspace")
        assert torch.allclose(ours, sampling.sample("ddim", eps_fn, PROCESS, noise, 7, "linspace"), atol=1e-6)
    assert "recipe_euler" not in SAMPLERS


def test_a_data_set_is_one_registered_loader():
    @dataset("recipe_set", 1, 8, ("dark", "light"), default_model="unet_tiny", download=False)
    def _recipe_set(train: bool, root, download: bool, seed: int):
        g = torch.Generator().manual_seed(seed + int(train))
        labels = torch.randint(0, 2, (40 if train else 10,), generator=g)
        pixels = (labels.view(-1, 1, 1, 1).float() * 2 - 1).expand(-1, 1, 8, 8).clone()  # floats in [-1, 1]
        return pixels, labels

    with registered(DATASETS, "recipe_set", "dataset"):
        cfg = _compose("train_diffusion", "dataset=recipe_set")
        assert cfg.model.name == "unet_tiny" and cfg.dataset.image_size == 8  # its default model and size
        data = load_from_config({"name": "recipe_set", "image_size": 8}, "test")
        assert data.images.shape == (10, 1, 8, 8) and data.class_names == ["dark", "light"]
        _script_module("train_diffusion.py").check(cfg)
    assert "recipe_set" not in DATASETS


def test_every_label_dropout_draws_through_conditions():
    """One null mechanism: every function named drop_labels outside guidelab/conditions.py delegates to it (to
    drop_labels, or to drop_fields, which drops plain labels through drop_labels), and no other module draws a
    dropout mask of its own (torch.rand(...) < p_uncond)."""
    package = Path(config.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "conditions.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "drop_labels":
                calls = [c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
                assert {"drop_labels", "drop_fields"} & set(calls), f"{path.name}: drop_labels does not delegate"
        text = path.read_text()
        assert not any(f"< {p}" in text for p in ("p_uncond", "self.p_uncond", "p_field", "self.p_field")), path.name
