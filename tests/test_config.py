"""Configs: every group option composes, Hydra types every key, each registered guidance mode, sampler and dataset has
exactly its config file, and presets select groups through their defaults list while a group named on the command
line wins."""

import re
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import guidelab.config  # noqa: F401  (the schemas and resolvers)
from conftest import CONFIGS
from guidelab.config import groups_of
from guidelab.data import DATASETS
from guidelab.guidance import MODES
from guidelab.sampling import SAMPLERS

SCRIPTS = ("train_diffusion", "train_classifier", "sample")


def _compose(script, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=script, overrides=list(overrides), return_hydra_config=True)


def options(script: str, group: str) -> list[str]:
    return sorted(p.stem for p in groups_of(script)[group].glob("*.yaml"))


CASES = [
    (script, group, option) for script in SCRIPTS for group in groups_of(script) for option in options(script, group)
]


@pytest.mark.parametrize("script,group,option", CASES, ids=[f"{s}-{g}={o}" for s, g, o in CASES])
def test_every_group_option_composes(script, group, option):
    cfg = _compose(script, [f"{group}={option}"])
    assert cfg.hydra.runtime.choices[group] == option
    if group != "experiment":
        assert cfg[group].get("name", cfg[group].get("schedule")) == option


def test_groups_of_each_script():
    assert list(groups_of("train_diffusion")) == ["dataset", "model", "diffusion", "logger", "experiment"]
    assert list(groups_of("train_classifier")) == ["dataset", "classifier", "diffusion", "logger", "experiment"]
    assert list(groups_of("sample")) == ["guidance", "sampler", "logger", "experiment"]


def _yaml(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{name}.yaml"))


def test_every_registered_entry_has_exactly_its_config_file():
    """One function, one yaml: the files of configs/guidance/ and configs/sampler/ are the registries' entries, each
    file holds exactly its function's keyword parameters (plus name, and a sampler's shared grid keys) with the
    function's defaults as values; configs/dataset/ holds the registered datasets at their native size."""
    for group, registry, shared in (("guidance", MODES, set()), ("sampler", SAMPLERS, {"steps", "spacing", "clip_x0"})):
        assert options("sample", group) == sorted(registry), group
        for name, entry in registry.items():
            values = _yaml(group, name)
            assert values.pop("name") == name
            assert set(values) == set(entry.params) | shared, name
            for key, param in entry.params.items():
                default = list(param.default) if isinstance(param.default, tuple) else param.default  # yaml lists
                assert values[key] == default, (name, key)
    assert options("train_diffusion", "dataset") == sorted(DATASETS)
    for name, spec in DATASETS.items():
        assert _yaml("dataset", name)["name"] == name and _yaml("dataset", name)["image_size"] == spec.image_size
        assert (CONFIGS / "model" / f"{spec.default_model}.yaml").is_file(), name


def test_each_dataset_names_its_default_model_and_an_explicit_model_wins():
    for name, spec in DATASETS.items():
        assert _compose("train_diffusion", [f"dataset={name}"]).model.name == spec.default_model
    assert _compose("train_diffusion", ["dataset=cifar10"]).model.name == "unet_cifar"
    assert _compose("train_diffusion", ["dataset=cifar10", "model=unet_small"]).model.name == "unet_small"
    assert _compose("train_diffusion", ["experiment=demo", "dataset=cifar10"]).model.name == "unet16"  # the preset's


@pytest.mark.parametrize(
    "script,override,cause",
    [
        ("train_diffusion", "seed=abc", "could not be converted to Integer"),
        ("train_diffusion", "train.steps=1.5", "could not be converted to Integer"),
        ("train_classifier", "train.compile=maybe", "is not a valid bool"),
        ("sample", "scale=high", "could not be converted to Float"),
        ("sample", "guidance=cfg_rescale guidance.phi=abc", "could not be converted to Float"),
        ("sample", "sampler=ddim sampler.eta=[1]", "could not be converted to Float"),
        ("sample", "sampler=ddpm sampler.eta=0.5", "Key 'eta' not in 'sampler_ddpm'"),
        ("train_diffusion", "model.channels=1.5", "could not be converted to Integer"),
    ],
)
def test_types_are_hydras(script, override, cause):
    with pytest.raises(ConfigCompositionException) as e:
        _compose(script, override.split())
    assert cause in str(e.value) + str(e.value.__cause__)


PRESET_CASES = [
    (script, preset, group)
    for script in SCRIPTS
    for preset in options(script, "experiment")
    if preset != "none"
    for group in groups_of(script)
    if group != "experiment"
]


@pytest.mark.parametrize("script,preset,group", PRESET_CASES, ids=["-".join(c) for c in PRESET_CASES])
def test_every_preset_with_an_overridden_group(script, preset, group):
    """`experiment=X group=Y`: group Y as typed, everything else as the preset says (including what it sets inside
    the group, such as dataset.image_size or sampler.steps)."""
    base = _compose(script, [f"experiment={preset}"])
    other = next(o for o in options(script, group) if o != base.hydra.runtime.choices[group])
    cfg = _compose(script, [f"experiment={preset}", f"{group}={other}"])
    assert cfg.hydra.runtime.choices[group] == other
    for key in base:
        if key not in (group, "hydra"):
            assert cfg[key] == base[key], key
    for node, key in (("dataset", "image_size"), ("sampler", "steps")):  # set by the preset, not by its option
        if group == node and base[node][key] != _yaml(node, base[node].name)[key]:
            assert cfg[node][key] == base[node][key]


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_key_is_an_error(script):
    with pytest.raises(ConfigCompositionException, match="Could not override 'no_such_key'"):
        _compose(script, ["no_such_key=1"])


@pytest.mark.parametrize("script", sorted(p.name for p in (CONFIGS.parent / "scripts").glob("*.sh")))
def test_study_scripts_parse_and_name_existing_presets(script):
    path = CONFIGS.parent / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    for preset in re.findall(r'lib\.sh" ([a-z]\w+)', path.read_text()):
        for stage in SCRIPTS:
            assert (CONFIGS / stage / "experiment" / f"{preset}.yaml").exists(), (preset, stage)
