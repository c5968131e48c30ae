"""Every config group option composes with its script's primary config, presets apply, unknown keys are errors."""
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from conftest import CONFIGS

GROUPS = {
    "train_diffusion": ["dataset", "model", "diffusion", "logger", "experiment"],
    "train_classifier": ["dataset", "classifier", "diffusion", "logger", "experiment"],
    "sample": ["guidance", "sampler", "logger", "experiment"],
}
CASES = [(script, group, p.stem) for script, groups in GROUPS.items() for group in groups
         for p in sorted((CONFIGS / group).glob("*.yaml"))]


def _compose(script, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=script, overrides=list(overrides))


@pytest.mark.parametrize("script,group,option", CASES, ids=[f"{s}-{g}={o}" for s, g, o in CASES])
def test_every_group_option_composes(script, group, option):
    cfg = _compose(script, [f"{group}={option}"])
    assert cfg.seed is not None or script == "sample"
    if group in ("dataset", "model", "classifier", "guidance", "sampler", "logger") and option != "none":
        assert cfg[group].name == option or group == "model"  # model.name may differ from the file name in presets


def test_option_counts():
    """The groups hold what the README promises; every guidance mode and sampler has exactly one config file, named
    as its code names it, and each guidance file's keys are the keyword arguments its builder takes."""
    import inspect

    from omegaconf import OmegaConf

    from guidelab.guidance import BUILDERS, MODES
    from guidelab.sampling import SAMPLERS

    names = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in ("dataset", "guidance", "sampler")}
    assert names["dataset"] == ["cifar10", "fashion_mnist", "mnist", "mnist5k", "procedural"]
    assert names["guidance"] == sorted(MODES) and len(MODES) == 11
    assert names["sampler"] == sorted(SAMPLERS) == ["ddim", "ddpm", "dpmpp_2m"]
    for mode in MODES:
        keys = set(OmegaConf.load(CONFIGS / "guidance" / f"{mode}.yaml")) - {"name", "guide_ckpt"}
        assert keys == set(inspect.signature(BUILDERS[mode]).parameters) - {"ctx"}, mode


def test_presets_set_each_scripts_keys_and_the_command_line_wins():
    cfg = _compose("train_diffusion", ["experiment=smoke", "train.steps=7"])
    assert cfg.dataset.name == "procedural" and cfg.model.channels == 16 and cfg.train.steps == 7
    cfg = _compose("sample", ["experiment=smoke"])
    assert cfg.num_samples == 20 and cfg.sampler.steps == 5 and "train" not in cfg
    cfg = _compose("train_classifier", ["experiment=demo"])
    assert cfg.dataset.name == "mnist5k" and cfg.dataset.image_size == 16


@pytest.mark.parametrize("script", list(GROUPS))
def test_unknown_key_is_an_error(script):
    with pytest.raises(ConfigCompositionException, match="Could not override 'no_such_key'"):
        _compose(script, ["no_such_key=1"])


@pytest.mark.parametrize("script", sorted(p.name for p in (CONFIGS.parent / "scripts").glob("*.sh")))
def test_study_scripts_parse_and_name_existing_presets(script):
    import re
    import subprocess

    path = CONFIGS.parent / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    for preset in re.findall(r'lib\.sh" ([a-z]\w+)', path.read_text()):
        assert (CONFIGS / "experiment" / f"{preset}.yaml").exists(), preset
        for stage in ("train_diffusion", "train_classifier", "sample"):
            assert (CONFIGS / "experiment_stage" / preset / f"{stage}.yaml").exists(), (preset, stage)
