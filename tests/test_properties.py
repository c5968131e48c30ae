"""Property-based (hypothesis): every config key of every script, under every option of every config group, takes
values drawn from the classes a new user types by mistake (wrong types, negatives, zero, huge, non-finite, beyond
float32 and int64, strings, empty lists). What the script does before it runs (Hydra's composition with guidelab's
structured configs, then every value check) must answer each in one line (`error: ...`, exit status 2) or accept it,
never with a traceback. `check_command_line` (conftest) asserts the one line; any other exception fails the test.

Values that pass the checks and are still beyond what the machine can do (sizes far beyond memory) are run end to end
in tests/test_errors.py."""

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import CONFIGS, check_command_line

SCRIPTS = ("train_diffusion", "train_classifier", "sample")
NOT_DRAWN = ("hydra", "ckpt", "classifier_ckpt", "evaluator_ckpt", "second_evaluator_ckpt", "guide_ckpt", "runs_root")

FIXED = [  # the classes, one representative each; hypothesis draws more of each below
    *("abc", "''", "[]", "[1,2]", "{a:1}", "true", "null", "x y"),  # wrong types, strings, empty and odd lists
    *("-1", "-0.5", "-1e9", "0", "0.0"),  # negatives and zero
    *("1000000000000", str(2**63), str(10**30), "3e38", "1e39", "1e308"),  # huge, beyond int64 and float32
    *("nan", "inf", "-inf"),  # non-finite
]
VALUES = st.one_of(
    st.sampled_from(FIXED),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.integers(min_value=-(10**6), max_value=10**6), max_size=3).map(lambda v: str(v).replace(" ", "")),
    st.text(alphabet="abcxyz_-.0123", min_size=1, max_size=6),
)


@functools.cache
def drawn_keys(script: str) -> list[tuple[tuple[str, ...], str]]:
    """(the group choices that bring the key in, key) for every leaf key under every option of every group."""
    from hydra import compose, initialize_config_dir

    from guidelab import config

    config.register()

    def leaves(node, prefix=""):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.") if OmegaConf.is_dict(v) else [f"{prefix}{k}"]

    found: dict[str, tuple[str, ...]] = {}
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        choices = [()] + [
            (f"{group}={option}",)
            for group, options in config.groups_of(script).items()
            if group != "experiment"
            for option in options
        ]
        for choice in choices:
            for key in leaves(compose(script, list(choice))):
                if key.split(".")[0] not in NOT_DRAWN and key not in found:
                    found[key] = choice
    return sorted((choice, key) for key, choice in found.items())


def test_every_script_has_its_keys_drawn():
    """The property below draws from these; a script whose keys could not be listed would test nothing."""
    counts = {script: len(drawn_keys(script)) for script in SCRIPTS}
    assert all(n >= 30 for n in counts.values()), counts
    assert any(key.startswith("guidance.") for _, key in drawn_keys("sample"))  # the modes' own keys are included
    assert any(key.startswith("sampler.") for _, key in drawn_keys("sample"))


def _answers_in_one_line_or_passes(script: str, choice: tuple[str, ...], key: str, value: str) -> None:
    check_command_line(f"{script}.py", *choice, f"{key}={value}", register=False)  # asserts the one line


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_key_answers_every_class_of_value_in_one_line(script):
    """Each key once per class representative of FIXED, cycled over the keys so every key meets two classes and every
    class many keys (three per key took 173 s of the suite for the same reach over the classes)."""
    keys = drawn_keys(script)
    for i, (choice, key) in enumerate(keys):
        for value in (FIXED[i % len(FIXED)], FIXED[(i + 7) % len(FIXED)]):
            _answers_in_one_line_or_passes(script, choice, key, value)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_drawn_values_for_drawn_keys_answer_in_one_line(script, data):
    choice, key = data.draw(st.sampled_from(drawn_keys(script)), label="key")
    _answers_in_one_line_or_passes(script, choice, key, data.draw(VALUES, label="value"))
