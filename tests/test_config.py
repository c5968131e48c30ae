"""Configs: every group option composes, Hydra types every key, each registered guidance mode, sampler and dataset has
exactly its config file, and presets select groups through their defaults list while a group named on the command
line wins."""

import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

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
    return groups_of(script)[group]


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


def test_each_registered_function_is_its_group_option_and_each_default_is_written_once():
    """guidance=<mode>, sampler=<name> and dataset=<name> are generated from the registered code (no yaml holds a
    second copy): the option's keys are exactly the function's keyword parameters (plus name, and a sampler's shared
    grid keys) at the function's defaults; a dataset's are its root, its native size and its download default."""
    assert not any((CONFIGS / group).exists() for group in ("guidance", "sampler", "dataset"))
    for group, registry in (("guidance", MODES), ("sampler", SAMPLERS)):
        assert options("sample", group) == sorted(registry), group
        for name, entry in registry.items():
            values = OmegaConf.to_container(_compose("sample", [f"{group}={name}"])[group])
            assert values.pop("name") == name
            shared = {k: entry.shared.get(k, v.default) for k, v in registry.shared.items()}
            assert set(values) == set(entry.params) | set(shared), name
            for key, param in entry.params.items():
                default = list(param.default) if isinstance(param.default, tuple) else param.default  # config lists
                assert values[key] == default, (name, key)
            assert {k: values[k] for k in shared} == shared, name
    assert SAMPLERS["heun"].shared == {"steps": 10, "spacing": "logsnr"}  # a sampler's own grid defaults
    assert options("train_diffusion", "dataset") == sorted(DATASETS)
    for name, spec in DATASETS.items():
        values = OmegaConf.to_container(_compose("train_diffusion", [f"dataset={name}"]).dataset)
        download = {} if spec.download is None else {"download": spec.download}  # folder: never downloaded
        own = spec.options  # a set's own keys (folder: channels, skip_bad, holdout, split_seed)
        assert values == {"name": name, "root": None, "image_size": spec.image_size, **download, **own}
        assert name == "folder" or (spec.download is not None and not own)  # the registered sets stay as they were
        assert (CONFIGS / "model" / f"{spec.default_model}.yaml").is_file(), name
    assert not DATASETS["procedural"].download and DATASETS["cifar10"].download


@pytest.mark.slow  # three scripts started
def test_help_lists_the_scripts_own_groups_only():
    out = subprocess.run(
        [sys.executable, str(CONFIGS.parent / "sample.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=CONFIGS.parent,
    )
    assert out.returncode == 0, out.stderr
    listing = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = [line.split(":")[0] for line in listing.splitlines() if ": " in line]
    assert groups == ["guidance", "sampler", "logger", "experiment"], out.stdout
    assert "schema" not in out.stdout and "train_diffusion/experiment" not in out.stdout
    assert "guidance: apg, autoguidance, cads, cfg," in out.stdout and "  eta: 0.0" in out.stdout  # options, defaults


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
        if group == node and base[node][key] != _compose(script, [f"{node}={base[node].name}"])[node][key]:
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
